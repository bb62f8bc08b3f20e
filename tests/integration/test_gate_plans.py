"""Plans end to end: propose checks every step without acting; apply asks the operator once,
re-decides each step, and stops at the first refusal."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, dom0_admin, gate_call

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("plans") / "root")
    try:
        yield s
    finally:
        s.stop()


def exists(stack: Stack, name: str) -> bool:
    listing = dom0_admin(stack, "dom0", "admin.vm.List")
    return any(line.split(" ")[0] == name for line in listing.splitlines())


def propose(stack: Stack, steps: list[dict[str, Any]], title: str = "") -> dict[str, Any]:
    reply = gate_call(stack, "@adminvm", "qmcp.PlanPropose", {"steps": steps, "title": title})
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["result"]
    return result


BUILD = [
    {"op": "qube.create", "target": "ai-debian", "args": {"name": "ai-p1", "label": "blue"}},
    {"op": "qube.start", "target": "ai-p1", "args": {}},
    {"op": "qube.remove", "target": "ai-usb", "args": {}},
]


def test_propose_decides_every_step_and_changes_nothing(stack: Stack) -> None:
    plan = propose(stack, BUILD, "a build box")
    assert [s["verdict"]["decision"] for s in plan["steps"]] == ["allowed", "deferred", "allowed"]
    assert [s["verdict"]["consent"] for s in plan["steps"]] == [False, False, True]
    assert all(s["verdict"]["error"] is None for s in plan["steps"])
    assert plan["needs_consent"] is True and plan["plan_id"] and plan["digest"]
    assert not exists(stack, "ai-p1") and exists(stack, "ai-usb")


def test_a_plan_with_a_hidden_or_refused_step_is_not_kept(stack: Stack) -> None:
    plan = propose(
        stack,
        [
            {"op": "qube.start", "target": "ai-dev", "args": {}},
            {"op": "qube.start", "target": "vault", "args": {}},
            {"op": "qube.run", "target": "ai-notes", "args": {"command": ["id"]}},
        ],
    )
    assert plan["plan_id"] is None
    verdicts = [s["verdict"] for s in plan["steps"]]
    assert verdicts[0] == {"decision": "allowed", "consent": False, "error": None}
    assert verdicts[1] == {
        "decision": "refused",
        "consent": False,
        "error": {"code": "not-found", "message": "no such qube, or not yours"},
    }
    assert verdicts[2]["decision"] == "refused"
    assert verdicts[2]["error"]["code"] == "insufficient-tier"


@pytest.mark.parametrize(
    "step",
    [
        {"op": "plan.apply", "target": None, "args": {}},
        {"op": "qube.info", "target": "ai-dev"},
        {"op": "qube.start", "target": None, "args": {}},
        {"op": "admin.vm.Kill", "target": "x"},
    ],
    ids=["nested-plan", "read-step", "missing-target", "not-an-operation"],
)
def test_malformed_steps_are_invalid_input(stack: Stack, step: dict[str, Any]) -> None:
    reply = gate_call(stack, "@adminvm", "qmcp.PlanPropose", {"steps": [step]})
    assert reply["error"]["code"] == "invalid-input"


def test_apply_needs_the_proposed_digest_and_runs_once(stack: Stack) -> None:
    plan = propose(stack, [{"op": "qube.start", "target": "ai-dev", "args": {}}])
    wrong = gate_call(
        stack, "@adminvm", "qmcp.PlanApply", {"plan_id": plan["plan_id"], "digest": "0" * 16}
    )
    assert wrong["error"]["code"] == "invalid-input"
    # a wrong digest does not consume the plan; the right one applies it, once
    args = {"plan_id": plan["plan_id"], "digest": plan["digest"]}
    first = gate_call(stack, "@adminvm", "qmcp.PlanApply", args)
    assert first["ok"] is True and first["result"]["completed"] == 1
    again = gate_call(stack, "@adminvm", "qmcp.PlanApply", args)
    assert again["error"]["code"] == "invalid-input"


def test_a_denied_plan_runs_no_step(stack: Stack) -> None:
    plan = propose(stack, BUILD)
    operator = answer_when_pending(stack, "deny", op="plan.apply")
    reply = gate_call(
        stack, "@adminvm", "qmcp.PlanApply", {"plan_id": plan["plan_id"], "digest": plan["digest"]}
    )
    operator.join(10)
    assert reply["error"]["code"] == "consent-denied"
    assert not exists(stack, "ai-p1") and exists(stack, "ai-usb")


def test_one_approval_covers_the_whole_plan(stack: Stack) -> None:
    plan = propose(stack, BUILD, "a build box")
    operator = answer_when_pending(stack, "approve", op="plan.apply")
    reply = gate_call(
        stack, "@adminvm", "qmcp.PlanApply", {"plan_id": plan["plan_id"], "digest": plan["digest"]}
    )
    operator.join(10)
    assert reply["ok"] is True, reply
    result = reply["result"]
    assert (result["completed"], result["stopped_at"]) == (3, None)
    assert exists(stack, "ai-p1") and not exists(stack, "ai-usb")
    info = gate_call(stack, "ai-p1", "qmcp.Info")["result"]
    assert info["properties"]["label"] == "blue" and info["state"] == "Running"
    steps = [ln for ln in audit_lines(stack) if ln["detail"].get("plan_id") == plan["plan_id"]]
    assert {ln["op"] for ln in steps} == {
        "plan.apply",
        "qube.create",
        "qube.start",
        "qube.remove",
    }
    # the one question is journaled before it is asked (recovery records it if never answered)
    asked = [ln for ln in steps if ln["detail"].get("consent") == "asked"]
    assert [(ln["op"], ln["outcome"]) for ln in asked] == [("plan.apply", "pending")]
    assert all(
        ln["detail"].get("consent") in (None, "plan", "approved") for ln in steps if ln not in asked
    )


def test_apply_stops_at_the_first_step_refused_at_run_time(stack: Stack) -> None:
    plan = propose(
        stack,
        [
            {"op": "qube.start", "target": "ai-web", "args": {}},
            {"op": "qube.run", "target": "ai-web", "args": {"command": ["true"]}},
            {"op": "qube.shutdown", "target": "ai-web", "args": {"force": True}},
        ],
    )
    stack.admin("tier", "ai-web", "read")  # the operator lowers the tier after the proposal
    try:
        result = gate_call(
            stack,
            "@adminvm",
            "qmcp.PlanApply",
            {"plan_id": plan["plan_id"], "digest": plan["digest"]},
        )["result"]
    finally:
        stack.admin("tier", "ai-web", "net")
    assert result["stopped_at"] == 0 and result["completed"] == 0
    assert result["steps"][0]["error"]["code"] == "insufficient-tier"


def test_the_operator_reads_a_proposed_plan_and_its_salt_state(stack: Stack) -> None:
    import yaml

    steps = [
        {"op": "qube.create", "target": "ai-debian", "args": {"name": "ai-salt", "label": "blue"}},
        {"op": "qube.start", "target": "ai-salt", "args": {}},
        {"op": "qube.remove", "target": "ai-salt", "args": {}},
    ]
    plan = propose(stack, steps, "salt {{ view }}")
    assert plan["plan_id"], plan
    listed = stack.admin("plan", "list")
    assert listed.returncode == 0 and plan["plan_id"] in listed.stdout
    shown = stack.admin("plan", "show", plan["plan_id"])
    assert "1. qube.start on ai-salt [deferred]" in shown.stdout
    assert "2. qube.remove on ai-salt [" in shown.stdout
    salt = stack.admin("plan", "show", plan["plan_id"], "--salt")
    assert salt.returncode == 0, salt.stderr
    states = yaml.safe_load(salt.stdout)
    functions = [next(iter(body)) for body in states.values()]
    assert functions == ["qvm.present", "qvm.prefs", "cmd.run", "qvm.start", "qvm.absent"]
    assert "{{" not in salt.stdout  # the agent's title is escaped data
    missing = stack.admin("plan", "show", "0000")
    assert missing.returncode == 1 and "no proposed plan 0000" in missing.stderr
    assert not exists(stack, "ai-salt")  # reading a plan changes nothing
