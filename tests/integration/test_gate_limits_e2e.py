"""Rate limits and refusal summaries end to end: agent → qrexec → gate daemon → audit log,
and the operator's ``status`` through the real command (issue 7 §6, issue 11 §3)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import audit_lines, gate_call

pytestmark = pytest.mark.bwrap

LIMITS = "[limits]\nrate = 20\nburst = 100\nrefused_rate = 1\nrefused_burst = 4\n\n[paths]"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("limits") / "root",
        config_edit=lambda t: t.replace("[paths]", LIMITS, 1),
    )
    try:
        yield s
    finally:
        s.stop()


def test_a_refusal_flood_is_rate_limited_and_every_refusal_is_counted(stack: Stack) -> None:
    before = len(audit_lines(stack))
    payload = {"property": "label", "value": "red"}
    replies = [gate_call(stack, "ai-notes", "qmcp.SetProperty", payload) for _ in range(12)]
    codes = [r["error"]["code"] for r in replies]
    assert codes[:4] == ["insufficient-tier"] * 4  # a read-tier qube: refused by the gate
    assert "rate-limited" in codes[4:]
    # the gate writes the counted refusals when it stops
    stack.stop()
    lines = audit_lines(stack)[before:]
    full = [x for x in lines if x["request_id"] != "refusals-summary"]
    counted = sum(x["detail"]["count"] for x in lines if x["request_id"] == "refusals-summary")
    assert len(full) + counted == 12, lines
    assert {x["code"] for x in lines} <= {"insufficient-tier", "rate-limited"}


def test_status_reports_the_running_gate(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_stack(tmp_path_factory.mktemp("status") / "root")
    try:
        out = s.admin("status", "--root", str(s.root)).stdout
        assert "gate serving: all requests" in out and "gate halted: None" in out, out
    finally:
        s.stop()
