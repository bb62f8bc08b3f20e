"""What a restarted gate finds and says (issue 11 §1, §5): a consent it died waiting on gets a
record, a broken configuration refuses instead of vanishing, ``doctor`` names a leftover."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.harness import FaultStack, assert_recovered, start_fault_stack

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module", name="fs")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    fs = start_fault_stack(tmp_path_factory.mktemp("restart") / "root")
    try:
        yield fs
    finally:
        fs.stack.stop()
        fs.proxy.stop()


def _wait_pending(fs: FaultStack, op: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = fs.stack.admin("pending", "--json")
        for item in json.loads(listed.stdout or "[]"):
            if item["op"] == op:
                return dict(item)
        time.sleep(0.1)
    raise AssertionError(f"no pending {op}")


def test_a_consent_the_gate_died_waiting_on_gets_a_record(fs: FaultStack) -> None:
    replies: list[dict[str, Any] | None] = []
    asker = threading.Thread(
        target=lambda: replies.append(fs.request("ai-usb", "qmcp.Remove", {})), daemon=True
    )
    asker.start()
    waiting = _wait_pending(fs, "qube.remove")
    fs.restart_gate()
    asker.join(10)
    assert replies == [None]  # the gate died: no answer, and certainly no removal
    assert "ai-usb" in fs.qubes()
    mine = [r for r in fs.audit() if r["op"] == "qube.remove"]
    assert [(r["outcome"], r["detail"].get("consent")) for r in mine] == [
        ("pending", "asked"),
        ("interrupted", "unanswered"),
    ]
    assert mine[1]["detail"]["reason"] == "consent never answered"
    assert mine[0]["request_id"] == mine[1]["request_id"]
    assert_recovered(fs, decided_netvm={})
    # and the restarted gate has forgotten the question: approving it does nothing
    answer = fs.stack.admin("approve", waiting["id"], "--digest", waiting["digest"])
    assert answer.returncode == 1 and "ai-usb" in fs.qubes()


def test_a_broken_configuration_refuses_everything_and_says_why(fs: FaultStack) -> None:
    good = fs.stack.config.read_text()
    fs.stack.config.write_text(good + "\n[budget\nthis is not toml\n")
    try:
        fs.restart_gate()  # it starts: no exit, no 127 for the agent
        before = len(fs.audit())
        for target, service in (("ai-dev", "qmcp.Start"), ("@adminvm", "qmcp.List")):
            reply = fs.request(target, service, {})
            assert reply is not None, service
            assert reply["error"]["code"] == "unavailable", reply
        added = fs.audit()[before:]
        # the state-changing request is recorded as refused; the read is not (as always)
        assert [(r["op"], r["decision"], r["code"]) for r in added] == [
            ("qube.start", "refused", "unavailable")
        ]
        pending = fs.stack.admin("pending")
        assert pending.returncode == 1
        assert "refuses every request" in pending.stderr and "not reachable" not in pending.stderr
        assert "configuration" in pending.stderr
        status = fs.stack.admin("status", "--root", str(fs.root))
        assert "config: error:" in status.stdout
        assert "gate: refusing every request" in status.stdout
    finally:
        fs.stack.config.write_text(good)
        fs.restart_gate()
    reply = fs.request("@adminvm", "qmcp.List", {})
    assert reply is not None and reply["ok"], reply
    assert "gate: serving" in fs.stack.admin("status", "--root", str(fs.root)).stdout


def test_doctor_names_a_half_born_leftover_and_the_way_out(fs: FaultStack) -> None:
    fs.dom0("dom0", "admin.vm.Create.AppVM", "ai-debian", b"name=ai-leftover label=gray")
    fs.dom0("ai-leftover", "admin.vm.tag.Set", "qubes-mcp-birth-00112233aabbccdd")
    try:
        report = fs.stack.admin("doctor", "--root", str(fs.root))
        assert report.returncode == 1
        line = next(ln for ln in report.stdout.splitlines() if "00112233aabbccdd" in ln)
        assert line.startswith("error: ai-leftover ")
        assert "qvm-remove ai-leftover" in line
    finally:
        fs.remove("ai-leftover")
    assert "00112233aabbccdd" not in fs.stack.admin("doctor", "--root", str(fs.root)).stdout
