"""The real ``qvm-*`` tools (``qubesadmin.tools.*.main``) against the emulated qubesd.

The tools are what an operator types in dom0; each must give the output and exit status it
gives on R4.3. Only their Admin API use is exercised: tools that need qrexec or a GUI are out.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def qvm(qapp: Any, qubesadmin: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``qvm-<tool> ARGS`` in-process: returns ``(exit status, stdout, stderr)``."""
    # The tools' argument parser reads the package version from its metadata; a source
    # checkout has none, so give it a minimal one (this is not client code).
    dist = tmp_path / "meta" / "qubesadmin-4.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qubesadmin\nVersion: 4.3\n")
    monkeypatch.syspath_prepend(str(tmp_path / "meta"))
    importlib.invalidate_caches()

    def run(tool: str, *args: str) -> tuple[int, str, str]:
        if tool in ("qvm-block", "qvm-pci"):  # installed as qvm-device under another name
            args = (tool[4:], *args)
            tool = "qvm-device"
        module = importlib.import_module(f"qubesadmin.tools.{tool.replace('-', '_')}")
        out, err = io.StringIO(), io.StringIO()
        # A fresh client per command, as each tool is its own process (some enable caching).
        app = qubesadmin.app.QubesLocal()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = module.main(list(args), app=app)
            except SystemExit as stop:
                status = stop.code
        return int(status or 0), out.getvalue(), err.getvalue()

    return run


def test_qvm_ls_raw_data(qvm: Any) -> None:
    status, out, _ = qvm(
        "qvm-ls", "--raw-data", "--fields", "name,class,state,label,template,netvm"
    )
    assert status == 0
    rows = {line.split("|")[0]: line.split("|")[1:] for line in out.splitlines()}
    assert rows["work"] == ["AppVM", "Halted", "blue", "debian-13-xfce", "-"]
    assert rows["sys-firewall"] == ["AppVM", "Running", "green", "debian-13-xfce", "sys-net"]
    assert rows["dom0"][:3] == ["AdminVM", "Running", "black"]


def test_qvm_prefs_get_set_default_and_error(qvm: Any) -> None:
    assert qvm("qvm-prefs", "--get", "work", "label")[:2] == (0, "blue\n")
    assert qvm("qvm-prefs", "work", "vcpus", "4")[0] == 0
    assert qvm("qvm-prefs", "work", "vcpus")[1] == "4\n"
    assert qvm("qvm-prefs", "-D", "work", "vcpus")[0] == 0
    status, _, err = qvm("qvm-prefs", "work", "netvm", "work")
    assert status == 1
    assert "error: The work qube does not provide network" in err
    status, out, _ = qvm("qvm-prefs", "work")
    assert status == 0
    assert any(line.split()[:3] == ["label", "-", "blue"] for line in out.splitlines())


def test_qvm_features_and_tags(qvm: Any) -> None:
    status, out, _ = qvm("qvm-features", "debian-13-xfce")
    assert status == 0
    assert {tuple(line.split()) for line in out.splitlines()} >= {("os", "Linux")}
    assert qvm("qvm-tags", "work", "add", "tag-x")[0] == 0
    assert "tag-x" in qvm("qvm-tags", "work", "list")[1].split()


def test_qvm_firewall_add_list_del_reset(qvm: Any) -> None:
    assert qvm("qvm-firewall", "work", "add", "action=drop", "dsthost=example.com")[0] == 0
    status, out, _ = qvm("qvm-firewall", "work", "list")
    assert status == 0
    assert "example.com" in out
    assert qvm("qvm-firewall", "work", "del", "--rule-no", "0")[0] == 0
    assert qvm("qvm-firewall", "work", "reset")[0] == 0
    lines = qvm("qvm-firewall", "work", "list")[1].splitlines()
    assert len(lines) == 2
    assert lines[1].split()[:2] == ["0", "accept"]


def test_qvm_block_list_attach_detach(qvm: Any) -> None:
    assert qvm("qvm-start", "sys-usb")[0] == 0
    assert qvm("qvm-start", "work")[0] == 0
    status, out, _ = qvm("qvm-block", "list")
    assert status == 0
    assert out.startswith("sys-usb:sda ")
    assert qvm("qvm-block", "attach", "work", "sys-usb:sda")[0] == 0
    out = qvm("qvm-block", "list", "work")[1]
    assert "work (attached: read-only=no, frontend-dev=xvdi)" in out
    assert qvm("qvm-block", "detach", "work", "sys-usb:sda")[0] == 0
    assert "attached" not in qvm("qvm-block", "list")[1]


def test_qvm_block_attach_to_halted_qube_reports_the_r43_message(qvm: Any) -> None:
    assert qvm("qvm-start", "sys-usb")[0] == 0
    status, _, err = qvm("qvm-block", "attach", "vault", "sys-usb:sda")
    assert status == 1
    assert "VM not running, cannot attach device, do you mean `assign`?" in err


def test_qvm_volume_info_and_list(qvm: Any) -> None:
    status, out, err = qvm("qvm-volume", "info", "work:private")
    assert (status, err) == (0, "")
    assert "revisions_to_keep  1" in out
    assert qvm("qvm-volume", "list")[0] == 0


def test_qvm_pool_info(qvm: Any) -> None:
    status, out, _ = qvm("qvm-pool", "info", "varlibqubes")
    assert status == 0
    assert "driver              file-reflink" in out


def test_qvm_check_start_pause_kill_shutdown(qvm: Any) -> None:
    assert qvm("qvm-check", "--running", "vault")[0] == 1
    assert qvm("qvm-start", "vault")[0] == 0
    assert qvm("qvm-check", "--running", "vault")[0] == 0
    assert qvm("qvm-pause", "vault")[0] == 0
    assert qvm("qvm-check", "--paused", "vault")[0] == 0
    assert qvm("qvm-unpause", "vault")[0] == 0
    assert qvm("qvm-kill", "vault")[0] == 0
    assert qvm("qvm-check", "--running", "vault")[0] == 1
    status, _, err = qvm("qvm-shutdown", "--wait", "--timeout", "5", "vault")
    assert status == 0, err  # shutting down a halted qube is not an error for the tool


def test_qvm_create_and_remove(qvm: Any) -> None:
    assert qvm("qvm-create", "-l", "red", "--template", "debian-13-xfce", "fid-q")[0] == 0
    assert qvm("qvm-check", "fid-q")[0] == 0
    assert qvm("qvm-remove", "-f", "fid-q")[0] == 0
    assert qvm("qvm-check", "fid-q")[0] != 0


def test_qvm_volume_revert_and_revisions(qvm: Any, qubesd: Any) -> None:
    """A shutdown keeps the state the run started from (file-reflink: revision ``1``);
    ``qvm-volume info`` lists it, ``qvm-volume revert`` (newest by default) puts it back,
    keeping the state it replaced as revision ``2``, and refuses while the qube runs with
    R4.3's message, and an unknown revision."""
    private = qubesd.paths.private_dir("work")
    (private / "note").write_text("before")
    assert qvm("qvm-start", "work")[0] == 0
    (private / "note").write_text("after")
    assert qvm("qvm-shutdown", "--wait", "work")[0] == 0
    status, out, _ = qvm("qvm-volume", "info", "work:private", "revisions")
    assert (status, out) == (0, "1\n")
    status, _, err = qvm("qvm-volume", "revert", "work:private")
    assert (status, err) == (0, ""), err
    assert (private / "note").read_text() == "before"
    assert qvm("qvm-volume", "info", "work:private", "revisions")[1] == "2\n"
    assert qvm("qvm-start", "work")[0] == 0
    status, _, err = qvm("qvm-volume", "revert", "work:private", "2")
    assert status != 0 and "not cleanly stopped" in err, err
    assert qvm("qvm-shutdown", "--wait", "work")[0] == 0
    assert qvm("qvm-volume", "revert", "work:private", "nope")[0] != 0
    assert (private / "note").read_text() == "before"
