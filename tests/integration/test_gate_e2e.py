"""The gate end to end on the emulator: installed with ``qubes-mcp-admin install --root``,
running as ``qubes-mcp-admin gate``, called through qrexec as the principal's qube.

Every operation works at the tier it needs and is refused below it; refusals are the gate's
fixed vocabulary; state changes land in the audit log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

NOT_FOUND = {"ok": False, "error": {"code": "not-found", "message": "no such qube, or not yours"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("gate") / "root")
    try:
        yield s
    finally:
        s.stop()


def test_list_shows_only_enrolled_qubes_with_their_tiers(stack: Stack) -> None:
    result = ok(gate_call(stack, "@adminvm", "qmcp.List"))
    tiers = {q["name"]: q["tier"] for q in result["qubes"]}  # type: ignore[index,union-attr]
    assert tiers["ai-dev"] == "exec" and tiers["ai-build"] == "full"
    assert tiers["ai-web"] == "net" and tiers["ai-notes"] == "read"
    for hidden in ("vault", "personal", "work", "sys-net", "mcp-control", "ai-dump", "dom0"):
        assert hidden not in tiers
    # the dump sink is named, so files can be copied into it, but it is not a visible qube
    assert result["dump_sinks"] == ["ai-dump"]


def test_info_redacts_out_of_scope_references_and_tier_tags(stack: Stack) -> None:
    info = ok(gate_call(stack, "ai-dev", "qmcp.Info"))
    assert info["tags"] == ["ai-managed"]
    props = info["properties"]
    assert props["netvm"] == "ai-egress"  # type: ignore[index]
    assert props["template"] == "<out-of-scope>"  # type: ignore[index]
    assert "qid" not in props  # type: ignore[operator]


@pytest.mark.parametrize("hidden", ["vault", "sys-firewall", "no-such-qube", "ai-dump", "dom0"])
def test_hidden_qubes_are_refused_identically_by_qrexec(stack: Stack, hidden: str) -> None:
    assert gate_call(stack, hidden, "qmcp.Info") == {"refused": 126}
    assert gate_call(stack, hidden, "qmcp.Run", {"command": ["id"]}) == {"refused": 126}


@pytest.mark.parametrize("hidden", ["vault", "no-such-qube", "sys-net"])
def test_hidden_copy_destinations_are_the_one_not_found(stack: Stack, hidden: str) -> None:
    reply = gate_call(
        stack, "ai-dev", "qmcp.Copy", {"destination": hidden, "paths": ["/etc/hostname"]}
    )
    assert reply == NOT_FOUND


def test_start_and_run_a_command_as_root_in_an_exec_qube(stack: Stack) -> None:
    ok(gate_call(stack, "ai-dev", "qmcp.Start"))
    result = ok(
        gate_call(stack, "ai-dev", "qmcp.Run", {"command": ["sh", "-c", "id -u; hostname"]})
    )
    assert result["exit_code"] == 0
    assert result["stdout"] == "0\nai-dev\n"


def test_read_tier_refuses_exec(stack: Stack) -> None:
    assert code(gate_call(stack, "ai-notes", "qmcp.Start")) == "insufficient-tier"
    assert (
        code(gate_call(stack, "ai-notes", "qmcp.Run", {"command": ["id"]})) == "insufficient-tier"
    )


def test_copy_lands_in_the_destinations_incoming(stack: Stack) -> None:
    ok(
        gate_call(
            stack, "ai-dev", "qmcp.Run", {"command": ["sh", "-c", "echo hi > /home/user/note"]}
        )
    )
    result = ok(
        gate_call(
            stack, "ai-dev", "qmcp.Copy", {"destination": "ai-build", "paths": ["/home/user/note"]}
        )
    )
    assert result["copied"] is True, result
    seen = ok(
        gate_call(
            stack,
            "ai-build",
            "qmcp.Run",
            {"command": ["cat", "/home/user/QubesIncoming/ai-dev/note"]},
        )
    )
    assert seen["stdout"] == "hi\n"


def test_bad_input_gets_a_clear_error_and_changes_nothing(stack: Stack) -> None:
    before = len(audit_lines(stack))
    reply = gate_call(stack, "ai-build", "qmcp.Run", {"command": "rm -rf /"})
    assert reply["error"]["message"] == "command must be a non-empty list of strings"  # type: ignore[index]
    raw = stack.call("ai-build", "qmcp.Run", b"\xff\xfe not json")
    assert b"payload is not valid JSON" in raw.stdout
    assert len(audit_lines(stack)) == before + 2  # refused, recorded, nothing run


def test_netvm_cannot_be_retargeted(stack: Stack) -> None:
    reply = gate_call(
        stack, "ai-build", "qmcp.SetProperty", {"property": "netvm", "value": "ai-web"}
    )
    assert code(reply) == "not-allowed"


def test_remove_waits_for_the_operator_and_a_denial_changes_nothing(stack: Stack) -> None:
    operator = answer_when_pending(stack, "deny", op="qube.remove")
    assert code(gate_call(stack, "ai-notes", "qmcp.Remove")) in ("insufficient-tier",)
    operator.join(0)
    # ai-usb is full and halted: the request reaches the operator, who says no
    operator = answer_when_pending(stack, "deny", op="qube.remove")
    assert code(gate_call(stack, "ai-usb", "qmcp.Remove")) == "consent-denied"
    operator.join(5)
    assert "ai-usb" in str(gate_call(stack, "@adminvm", "qmcp.List"))


def test_the_audit_chain_verifies(stack: Stack) -> None:
    result = stack.admin("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    ops = [line["op"] for line in audit_lines(stack)]
    assert "qube.start" in ops and "qube.run" in ops


def test_doctor_on_the_demo_fleet_reports_no_errors(stack: Stack) -> None:
    result = stack.admin("doctor", "--root", str(stack.root))
    assert "error:" not in result.stdout, result.stdout


def test_concurrent_creates_cannot_overshoot_the_qube_budget(tmp_path: Path) -> None:
    """The cap check and the create are one section: of four racing creates with room for
    one more qube, exactly one succeeds."""
    import concurrent.futures

    enrolled = 8  # ai-* qubes of the demo fleet, the dump sink not counted
    s = start_stack(
        tmp_path / "root",
        config_edit=lambda t: t.replace("max_qubes = 32", f"max_qubes = {enrolled + 1}"),
    )
    try:
        assert ok(gate_call(s, "@adminvm", "qmcp.Budget"))["qubes"] == enrolled
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(
                    lambda n: gate_call(s, "ai-debian", "qmcp.Create", {"name": f"ai-race{n}"}),
                    range(4),
                )
            )
        codes = sorted("ok" if r.get("ok") else r["error"]["code"] for r in replies)
        assert codes == ["budget-exceeded"] * 3 + ["ok"], replies
        assert ok(gate_call(s, "@adminvm", "qmcp.Budget"))["qubes"] == enrolled + 1
    finally:
        s.stop()


def _volume_size(stack: Stack, qube: str, volume: str) -> int:
    info = dom0_admin(stack, qube, "admin.vm.volume.Info", volume)
    return int(dict(line.split("=", 1) for line in info.splitlines())["size"])


def test_budget_reports_the_persistent_footprint(stack: Stack) -> None:
    """Private volumes of every enrolled qube, plus the root of templates and standalones —
    not every provisioned volume (the prior art's 8x over-count)."""
    budget = ok(gate_call(stack, "@adminvm", "qmcp.Budget"))
    names = [q["name"] for q in ok(gate_call(stack, "@adminvm", "qmcp.List"))["qubes"]]
    expected = sum(_volume_size(stack, n, "private") for n in names)
    expected += _volume_size(stack, "ai-debian", "root")
    assert budget["pool_used"] == expected
    assert budget["qubes"] == len(names)
    assert budget["pool_free"] == budget["pool_cap"] - budget["pool_used"]
