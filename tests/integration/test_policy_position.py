"""The generated policy's position on an emulator root (decision record 0011): install moves
it from its former name, and ``doctor`` lists the operator's rules it shadows or that override
it, for the control qube and the enrolled qubes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.enrolment import PolicyRefusedError
from qubes_mcp.dom0.operator import qubes_policy_tools as tools_module
from qubes_mcp.dom0.operator.install import install
from qubes_mcp.dom0.operator.qubes_policy_tools import PolicyTools
from qubes_mcp.stack import Stack, start_stack

pytestmark = pytest.mark.bwrap

USER = """\
qubes.ClipboardPaste * mcp-control @anyvm ask
qubes.Filecopy * ai-egress @anyvm allow
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("position") / "root")
    try:
        yield s
    finally:
        s.stop()


def test_install_replaces_the_file_of_the_former_name(stack: Stack) -> None:
    policy_dir = stack.root / "etc/qubes/policy.d"
    former = policy_dir / "30-qubes-mcp.policy"
    former.write_text((policy_dir / "25-qubes-mcp.policy").read_text())
    out = stack.admin("install", "--root", str(stack.root))
    assert out.returncode == 0, out.stderr
    assert not former.exists() and (policy_dir / "25-qubes-mcp.policy").exists()
    assert "the generated policy's former name" in out.stdout


def test_doctor_lists_the_user_rules_the_generated_file_shadows(stack: Stack) -> None:
    user = stack.root / "etc/qubes/policy.d/30-user.policy"
    user.write_text(USER)
    try:
        out = stack.admin("doctor", "--root", str(stack.root))
        assert "30-user.policy:1" in out.stdout and "control qube mcp-control" in out.stdout
        assert "30-user.policy:2" in out.stdout and "enrolled qube ai-egress" in out.stdout
        assert "no longer applies" in out.stdout
        assert "error:" not in out.stdout, out.stdout  # shadowed rules narrow nothing
    finally:
        user.unlink()


def test_doctor_errs_on_an_earlier_file_that_widens_a_sandbox(stack: Stack) -> None:
    widen = stack.root / "etc/qubes/policy.d/20-widen.policy"
    widen.write_text("qubes.Filecopy * @anyvm @anyvm allow\n")
    try:
        out = stack.admin("doctor", "--root", str(stack.root))
        assert out.returncode == 1
        assert "error: 20-widen.policy:1" in out.stdout
        assert "enrolled qube ai-egress through @anyvm" in out.stdout
    finally:
        widen.unlink()
    assert "20-widen" not in stack.admin("doctor", "--root", str(stack.root)).stdout


# --- Qubes' own tools: qubes-policy-lint checks, qubes-policy --replace writes -------------


def stand_in(path: Path, body: str) -> str:
    """An executable that records its argv (one JSON line per call) and runs ``body``."""
    record = path.with_suffix(".calls")
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        "data = sys.stdin.read()\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'stdin': data}) + '\\n')\n" + body
    )
    path.chmod(0o755)
    return str(path)


def calls(tool: str) -> list[dict[str, Any]]:
    record = Path(tool).with_suffix(".calls")
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_install_runs_qubes_policy_lint_on_the_directory_as_it_will_be(
    stack: Stack, tmp_path: Path
) -> None:
    lint = stand_in(tmp_path / "qubes-policy-lint", "")
    done = install(stack.root, tools=PolicyTools(lint=lint, policy=None))
    (call,) = calls(lint)
    assert call["argv"][0] == "--show-line"
    names = [Path(a).name for a in call["argv"][1:]]
    assert "25-qubes-mcp.policy" in names and "90-default.policy" in names
    assert f"checked the policy directory with {lint}" in done


def test_a_failing_lint_refuses_the_install_and_changes_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    lint = stand_in(
        tmp_path / "qubes-policy-lint", "print('X:3: error: invalid action'); sys.exit(1)\n"
    )
    policy = stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy"
    policy.write_text(policy.read_text() + "# before\n")
    before = policy.read_bytes()
    with pytest.raises(PolicyRefusedError) as refused:
        install(stack.root, tools=PolicyTools(lint=lint, policy=None))
    assert "qubes-policy-lint exited 1" in refused.value.reason
    assert "invalid action" in refused.value.reason
    assert policy.read_bytes() == before  # not rewritten
    install(stack.root, tools=PolicyTools(lint=None, policy=None))


def test_install_replaces_the_file_through_qubes_policy(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_dir = stack.root / "etc/qubes/policy.d"
    monkeypatch.setattr(tools_module, "SYSTEM_POLICY_DIR", policy_dir)
    body = (
        f"d = pathlib.Path({str(policy_dir)!r})\n"
        "if sys.argv[1] == '--replace': (d / (sys.argv[2] + '.policy')).write_text(data)\n"
        "if sys.argv[1] == '--remove': (d / (sys.argv[2] + '.policy')).unlink()\n"
    )
    qubes_policy = stand_in(tmp_path / "qubes-policy", body)
    (policy_dir / "25-qubes-mcp.policy").write_text("# stale\n")
    (policy_dir / "30-qubes-mcp.policy").write_text("# former\n")
    done = install(stack.root, tools=PolicyTools(lint=None, policy=qubes_policy))
    replace, remove = calls(qubes_policy)
    assert replace["argv"] == ["--replace", "25-qubes-mcp"]
    assert replace["stdin"] == (policy_dir / "25-qubes-mcp.policy").read_text()
    assert replace["stdin"].startswith("# 25-qubes-mcp.policy -- generated")
    assert remove["argv"] == ["--remove", "30-qubes-mcp"]
    assert not (policy_dir / "30-qubes-mcp.policy").exists()
    assert any(f"through {qubes_policy} --replace" in line for line in done)


def test_a_failing_qubes_policy_leaves_the_old_file(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_dir = stack.root / "etc/qubes/policy.d"
    monkeypatch.setattr(tools_module, "SYSTEM_POLICY_DIR", policy_dir)
    qubes_policy = stand_in(tmp_path / "qubes-policy", "print('denied'); sys.exit(1)\n")
    before = (policy_dir / "25-qubes-mcp.policy").read_bytes()
    with pytest.raises(OSError, match="qubes-policy --replace exited 1: denied"):
        install(stack.root, tools=PolicyTools(lint=None, policy=qubes_policy))
    assert (policy_dir / "25-qubes-mcp.policy").read_bytes() == before


def test_the_tools_are_found_on_path_then_in_usr_bin(tmp_path: Path) -> None:
    lint = stand_in(tmp_path / "qubes-policy-lint", "")
    found = PolicyTools.find(path=str(tmp_path))
    assert found.lint == lint
    assert found.policy == (
        "/usr/bin/qubes-policy" if os.access("/usr/bin/qubes-policy", os.X_OK) else None
    )
    # only the system directory is changed through qubes-policy
    assert not PolicyTools(lint=None, policy="/x").writes(tmp_path)
    assert PolicyTools(lint=None, policy="/x").writes(Path("/etc/qubes/policy.d"))


def test_flags_an_existing_config_makes_irrelevant_are_reported(stack: Stack) -> None:
    config = stack.root / "etc/qubes-mcp/config.toml"
    before = config.read_bytes()
    out = stack.admin(
        "install", "--root", str(stack.root), "--principal", "other-control", "--egress", "x-net"
    )
    assert out.returncode == 0, out.stderr
    assert f"note: ignored --principal other-control: {config} exists" in out.stdout
    assert f"note: ignored --egress x-net: {config} exists" in out.stdout
    assert config.read_bytes() == before
