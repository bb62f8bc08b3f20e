"""The dom0 service directory: admin.* links to qubesd, lookup order of service files."""

from __future__ import annotations

import os
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec.default_policy import install_default_policy
from qubes_mcp.sim.qrexec.dom0_rpc import ADMIN_METHODS, find_dom0_service, install_dom0_rpc


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_admin_links_point_at_qubesd_socket(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    install_dom0_rpc(paths)
    link = paths.rpc_dir / "admin.vm.List"
    assert link.is_symlink()
    assert (link.parent / os.readlink(link)).resolve() == paths.qubesd_sock.resolve()
    assert {"admin.vm.Start", "admin.vm.CreateDisposable", "admin.Events"} <= set(ADMIN_METHODS)


def test_install_keeps_operator_files(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    mine = executable(paths.rpc_dir / "admin.vm.List")
    install_dom0_rpc(paths)
    assert not mine.is_symlink()


def test_service_with_argument_file_wins_in_every_directory(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    generic_local = executable(paths.root / "usr/local/etc/qubes-rpc/my.Svc")
    specific_etc = executable(paths.rpc_dir / "my.Svc+arg")
    assert find_dom0_service(paths, "my.Svc", "arg") == specific_etc
    assert find_dom0_service(paths, "my.Svc", "other") == generic_local


def test_usr_local_before_etc(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    executable(paths.rpc_dir / "my.Svc")
    local = executable(paths.root / "usr/local/etc/qubes-rpc/my.Svc")
    assert find_dom0_service(paths, "my.Svc", "") == local


def test_non_executable_file_is_not_a_service(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    executable(paths.rpc_dir / "my.Svc").chmod(0o644)
    assert find_dom0_service(paths, "my.Svc", "") is None


def test_default_policy_installed_once_and_never_overwritten(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    written = install_default_policy(paths)
    names = {p.name for p in written}
    assert {"90-default.policy", "90-admin-default.policy", "admin-local-rwx"} <= names
    edited = paths.policy_dirs[-1] / "90-default.policy"
    edited.write_text("# mine\n")
    assert install_default_policy(paths) == []
    assert edited.read_text() == "# mine\n"
