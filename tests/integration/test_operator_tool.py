"""``qubes-mcp-admin`` against an emulator root: install/status/uninstall, doctor's findings,
and the tagging commands the operator uses instead of remembering the vocabulary."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.stack import EGRESS, PRINCIPAL, Stack, start_emulator, start_stack, stop_process
from tests.gate_e2e import dom0_admin, gate_call

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("operator") / "root")
    try:
        yield s
    finally:
        s.stop()


def tags(stack: Stack, qube: str) -> set[str]:
    return {t for t in dom0_admin(stack, qube, "admin.vm.tag.List").split() if t.startswith("ai-")}


def test_status_reports_a_current_install(stack: Stack) -> None:
    out = stack.admin("status", "--root", str(stack.root)).stdout
    n = len(OPERATIONS)
    assert "policy_current: True" in out and f"links: {n}/{n}" in out


def test_enrol_tier_and_unenrol(stack: Stack) -> None:
    assert gate_call(stack, "work", "qmcp.Info") == {"refused": 126}
    assert stack.admin("enrol", "work").returncode == 0
    assert tags(stack, "work") == {"ai-managed"}
    assert gate_call(stack, "work", "qmcp.Info")["result"]["tier"] == "read"
    assert stack.admin("tier", "work", "net").returncode == 0
    assert tags(stack, "work") == {"ai-managed", "ai-net"}
    assert stack.admin("tier", "work", "exec").returncode == 0
    assert tags(stack, "work") == {"ai-managed", "ai-exec"}
    assert stack.admin("unenrol", "work").returncode == 0
    assert tags(stack, "work") == set()
    assert gate_call(stack, "work", "qmcp.Info") == {"refused": 126}


def test_doctor_finds_what_weakens_the_boundary(stack: Stack) -> None:
    dom0_admin(stack, "personal", "admin.vm.tag.Set", "ai-full")  # tier, not enrolled
    dom0_admin(stack, "ai-notes", "admin.vm.tag.Set", "ai-dump")  # hybrid
    policy = stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy"
    saved = policy.read_text()
    policy.write_text(saved + "\nqubes.Filecopy * @anyvm @anyvm allow\n")  # drift
    try:
        out = stack.admin("doctor", "--root", str(stack.root))
        assert out.returncode == 1
        # a stray tier tag is an error: it is what an inherited copy looks like
        assert (
            "error: personal carries ai-full but is not enrolled in ai: tags copied from an "
            "enrolled qube (a disposable or clone?); not in scope; remove the tags or enrol it"
        ) in out.stdout
        assert "ai-notes is both enrolled and a dump sink" in out.stdout
        assert "ai-notes is registered in ai as a member but its tags disagree" in out.stdout
        assert "policy drift" in out.stdout
    finally:
        policy.write_text(saved)
        dom0_admin(stack, "personal", "admin.vm.tag.Remove", "ai-full")
        dom0_admin(stack, "ai-notes", "admin.vm.tag.Remove", "ai-dump")
    assert "error:" not in stack.admin("doctor", "--root", str(stack.root)).stdout


def test_policy_render_is_what_install_wrote(stack: Stack) -> None:
    rendered = stack.admin("policy", "render").stdout
    assert rendered == (stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy").read_text()


def test_the_systemd_unit_starts_the_gate_with_a_command_line_that_parses(stack: Stack) -> None:
    import shlex

    from qubes_mcp.dom0.operator import cli, cli_gate

    unit = (stack.root / "etc/systemd/system/qubes-mcp-gate.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    args = cli.build_parser().parse_args(argv[argv.index("gate") :])
    assert args.func is cli_gate.cmd_gate
    assert args.config == str(stack.root / "etc/qubes-mcp/config.toml")


# last: it takes the installation away from the module's stack
def test_uninstall_removes_everything_install_wrote_and_keeps_the_log(stack: Stack) -> None:
    root = stack.root
    out = stack.admin("uninstall", "--root", str(root))
    assert out.returncode == 0
    assert not (root / "etc/qubes/policy.d/25-qubes-mcp.policy").exists()
    assert not list((root / "etc/qubes-rpc").glob("qmcp.*"))
    assert not (root / "etc/systemd/system/qubes-mcp-gate.service").exists()
    assert (root / "var/log/qubes-mcp/audit.log").exists()
    assert gate_call(stack, "@adminvm", "qmcp.List") == {"refused": 126}


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind, mode and content (hash) or link target."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            found[rel] = f"link {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = f"dir {oct(st.st_mode)}"
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = f"file {oct(st.st_mode)} {digest}"
        else:
            found[rel] = f"other {oct(st.st_mode)}"
    return found


def test_uninstall_purge_leaves_the_root_as_it_was_before_install(tmp_path: Path) -> None:
    root = (tmp_path / "root").resolve()
    root.mkdir()
    emulator = start_emulator(root)
    try:
        before = _tree(root)

        def admin(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "qubes_mcp.dom0.operator.cli", *args, "--root", str(root)]
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

        installed = admin("install", "--principal", PRINCIPAL, "--egress", EGRESS)
        assert installed.returncode == 0, installed.stderr
        assert "no gate is running: it reads the configuration when it starts" in installed.stdout
        assert (root / "var/lib/qubes-mcp/enrolment.json").exists()
        purged = admin("uninstall", "--purge")
        assert purged.returncode == 0, purged.stderr
        assert _tree(root) == before, purged.stdout
        again = admin("uninstall", "--purge")
        assert (again.returncode, again.stdout) == (0, "nothing installed\n")
        assert _tree(root) == before
    finally:
        stop_process(emulator)
