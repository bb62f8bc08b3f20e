"""The agent's basic research task through the MCP tools, on the emulator with the real gate.

"Create a sandbox, run something in it, remove it": each piece as a tool call, and the whole as
one plan approved once. Plus what the agent reads on the way (``qube_list`` shows disposable
templates as ``qube_info`` does) and a state qubesd would refuse answered before the operator
is asked (attach from a halted backend).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from qubes_mcp.dom0.render import POLICY_NAME
from qubes_mcp.stack import Stack, start_stack
from tests.integration.test_server_e2e import operator, refusal, tool

pytestmark = pytest.mark.bwrap

POLICY = f"etc/qubes/policy.d/{POLICY_NAME}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("workflow") / "root")
    try:
        yield s
    finally:
        s.stop()


def _listed(stack: Stack) -> dict[str, dict[str, str]]:
    return {q["name"]: q for q in tool(stack, "qube_list")["qubes"]}


def _pending(stack: Stack) -> list[object]:
    return list(json.loads(stack.admin("pending", "--json").stdout or "[]"))


def test_qube_list_shows_the_class_qube_info_shows(stack: Stack) -> None:
    listed = _listed(stack)
    assert listed["ai-dvm"]["class"] == "DispVMTemplate"
    for name in ("ai-dvm", "ai-dev", "ai-debian"):
        assert listed[name]["class"] == tool(stack, "qube_info", qube=name)["class"], name


def test_a_disposable_it_created_is_removed_with_the_operators_approval(stack: Stack) -> None:
    made = tool(stack, "disposable_create", template="ai-dvm")
    name = made["name"]
    assert made["tier"] == "exec" and name in _listed(stack)
    with operator(stack, "approve", "qube.remove"):
        assert tool(stack, "qube_remove", qube=name) == {"qube": name, "removed": True}
    assert name not in _listed(stack)
    assert name not in (stack.root / POLICY).read_text().split()


def test_an_operators_exec_qube_is_still_not_removable(stack: Stack) -> None:
    assert refusal(stack, "qube_remove", qube="ai-dev").startswith("insufficient-tier: needs full")


def test_create_run_remove_is_one_plan_approved_once(stack: Stack) -> None:
    create = {"op": "qube.create", "target": "ai-debian", "args": {"name": "ai-lab1"}}
    run = {"op": "qube.run", "target": "ai-lab1", "args": {"command": ["echo", "poc"]}}
    shutdown = {"op": "qube.shutdown", "target": "ai-lab1", "args": {}}
    remove = {"op": "qube.remove", "target": "ai-lab1", "args": {}}
    # decided at the tier the new qube is born with: its removal is allowed ahead, with consent
    short = tool(stack, "plan_propose", steps=[create, run, remove], title="lab")
    assert short["plan_id"] is not None
    assert short["steps"][2]["verdict"] == {"decision": "deferred", "consent": True, "error": None}
    plan = tool(stack, "plan_propose", steps=[create, run, shutdown, remove], title="lab")
    assert [s["verdict"]["decision"] for s in plan["steps"]] == [
        "allowed",
        "deferred",
        "deferred",
        "deferred",
    ]
    assert plan["needs_consent"] is True
    with operator(stack, "approve", "plan.apply"):
        done = tool(stack, "plan_apply", plan_id=plan["plan_id"], digest=plan["digest"])
    assert (done["completed"], done["stopped_at"]) == (4, None), done
    assert done["steps"][1]["result"]["stdout"] == "poc\n"
    assert done["steps"][3]["result"] == {"qube": "ai-lab1", "removed": True}
    assert "ai-lab1" not in _listed(stack)
    assert "ai-lab1" not in (stack.root / POLICY).read_text().split()


def test_a_deferred_step_is_refused_at_the_tier_the_new_qube_is_born_with(stack: Stack) -> None:
    # born at exec from ai-debian: a full-tier step on it is refused at propose time
    steps = [
        {"op": "qube.create", "target": "ai-debian", "args": {"name": "ai-lab2"}},
        {
            "op": "property.set",
            "target": "ai-lab2",
            "args": {"property": "label", "value": "red"},
        },
    ]
    plan = tool(stack, "plan_propose", steps=steps)
    assert plan["plan_id"] is None
    verdict = plan["steps"][1]["verdict"]
    assert (verdict["decision"], verdict["consent"]) == ("refused", False)
    assert verdict["error"]["code"] == "insufficient-tier"
    assert "ai-lab2" not in _listed(stack)


def test_attach_from_a_halted_backend_is_invalid_state_before_consent(stack: Stack) -> None:
    tool(stack, "qube_start", qube="ai-build")
    assert _listed(stack)["ai-usb"]["state"] == "Halted"
    text = refusal(stack, "device_attach", qube="ai-build", backend="ai-usb", device="sdb")
    assert text.startswith("invalid-state: the backend is not running"), text
    assert _pending(stack) == []
    text = refusal(stack, "device_detach", qube="ai-build", backend="ai-usb", device="sdb")
    assert text.startswith("invalid-state: the device is not attached there"), text
    log = (stack.root / "var/log/qubes-mcp/audit.log").read_text().splitlines()
    line = json.loads([x for x in log if '"device.attach"' in x][-1])
    assert (line["decision"], line["outcome"], line["code"]) == (
        "refused",
        "not-run",
        "invalid-state",
    )
    assert "consent_id" not in line["detail"]
