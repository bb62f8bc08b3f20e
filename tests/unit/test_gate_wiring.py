"""The operations table, the handlers and the policy renderer describe the same operations."""

from __future__ import annotations

from qubes_mcp.dom0.enrolment import Registry
from qubes_mcp.dom0.gate import HANDLERS
from qubes_mcp.dom0.operations import OPERATIONS, Target
from qubes_mcp.dom0.render import render_policy
from tests.gate_fixtures import config


def test_every_operation_has_exactly_one_way_to_run() -> None:
    plan_ops = {op.name for op in OPERATIONS if op.name.startswith("plan.")}
    assert plan_ops == {"plan.propose", "plan.apply"}
    assert set(HANDLERS) == {op.name for op in OPERATIONS} - plan_ops


def test_services_are_unique_and_in_the_qmcp_namespace() -> None:
    services = [op.service for op in OPERATIONS]
    assert len(services) == len(set(services))
    assert all(s.startswith("qmcp.") and s[5:].isalnum() for s in services)


def test_the_policy_allows_each_operation_where_the_table_says() -> None:
    registry = Registry().enrolled("ai", "ai-dev", "u-1", "AppVM", by="operator")
    text = render_policy(config(), registry)
    for op in OPERATIONS:
        target = "@adminvm" if op.target is Target.GLOBAL else "ai-dev"  # registered names
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith(op.service + " ") and "mcp-control" in ln
        )
        assert line.split()[3] == target and line.endswith("allow target=@adminvm"), line
