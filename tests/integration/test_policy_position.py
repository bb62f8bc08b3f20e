"""The generated policy's position on an emulator root (decision record 0011): install moves
it from its former name, and ``doctor`` lists the operator's rules it shadows or that override
it, for the control qube and the enrolled qubes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
