"""Authority over a qube's root is authority over the qube (issue 7 §3), end to end.

The attack: a template the agent may only read becomes the root filesystem of a qube it fully
controls — by setting the property, or by having a create path copy such a reference into a
new qube (a disposable of a dvm template built on it, a clone of a qube built on it). Each is
refused by qrexec → gate → qubesd on the emulator, and nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from qubes_mcp.dom0.reader import property_value
from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

READ_TEMPLATE = "ai-debian"  # enrolled; its ai-exec tag is taken away for these tests


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("refs") / "root")
    try:
        dom0_admin(s, READ_TEMPLATE, "admin.vm.tag.Remove", "ai-exec")
        yield s
    finally:
        s.stop()


def prop(stack: Stack, qube: str, name: str) -> str:
    return property_value(dom0_admin(stack, qube, "admin.vm.property.Get", name))


def names(stack: Stack) -> set[str]:
    listed = dom0_admin(stack, "dom0", "admin.vm.List")
    return {line.split(" ", 1)[0] for line in listed.splitlines()}


@contextlib.contextmanager
def operator_sets(stack: Stack, qube: str, name: str, value: str) -> Iterator[None]:
    """The operator wires ``qube`` in dom0 (no gate), and undoes it afterwards."""
    before = prop(stack, qube, name)
    dom0_admin(stack, qube, "admin.vm.property.Set", name, value.encode())
    try:
        yield
    finally:
        dom0_admin(stack, qube, "admin.vm.property.Set", name, before.encode())


def test_the_agent_sees_the_template_at_read_tier(stack: Stack) -> None:
    listed = ok(gate_call(stack, "dom0", "qmcp.List"))
    tiers = {q["name"]: q["tier"] for q in listed["qubes"]}
    assert tiers[READ_TEMPLATE] == "read" and tiers["ai-build"] == "full"


def test_a_read_tier_template_cannot_become_a_full_qubes_root(stack: Stack) -> None:
    before = prop(stack, "ai-build", "template")
    reply = gate_call(
        stack, "ai-build", "qmcp.SetProperty", {"property": "template", "value": READ_TEMPLATE}
    )
    assert code(reply) == "insufficient-tier"
    assert prop(stack, "ai-build", "template") == before


def test_a_read_tier_dvm_cannot_become_a_full_qubes_default_dispvm(stack: Stack) -> None:
    dom0_admin(stack, "ai-dvm", "admin.vm.tag.Remove", "ai-exec")
    try:
        reply = gate_call(
            stack, "ai-build", "qmcp.SetProperty", {"property": "default_dispvm", "value": "ai-dvm"}
        )
    finally:
        dom0_admin(stack, "ai-dvm", "admin.vm.tag.Set", "ai-exec")
    assert code(reply) == "insufficient-tier"


@pytest.mark.parametrize(
    ("service", "payload"),
    [("qmcp.CreateDisposable", {}), ("qmcp.RunDisposable", {"command": ["id"]})],
)
def test_no_disposable_runs_on_a_read_tier_root(
    stack: Stack, service: str, payload: dict[str, object]
) -> None:
    before = names(stack)
    with operator_sets(stack, "ai-dvm", "template", READ_TEMPLATE):
        reply = gate_call(stack, "ai-dvm", service, payload)
    assert code(reply) == "not-allowed"
    assert "ai-debian (template)" in reply["error"]["message"]
    assert names(stack) == before


def test_no_clone_runs_on_a_read_tier_root(stack: Stack) -> None:
    with operator_sets(stack, "ai-build", "template", READ_TEMPLATE):
        reply = gate_call(stack, "ai-build", "qmcp.Clone", {"name": "ai-laundered"})
    assert code(reply) == "not-allowed"
    assert "ai-laundered" not in names(stack)


def test_at_exec_the_same_requests_are_allowed(stack: Stack) -> None:
    """The control: the refusals above are the tier rule, not something else."""
    before = prop(stack, "ai-build", "template")
    dom0_admin(stack, READ_TEMPLATE, "admin.vm.tag.Set", "ai-exec")
    try:
        reply = gate_call(
            stack, "ai-build", "qmcp.SetProperty", {"property": "template", "value": READ_TEMPLATE}
        )
        assert ok(reply)["value"] == READ_TEMPLATE
        with operator_sets(stack, "ai-dvm", "template", READ_TEMPLATE):
            ran = ok(gate_call(stack, "ai-dvm", "qmcp.RunDisposable", {"command": ["true"]}))
        assert ran["exit_code"] == 0
    finally:
        dom0_admin(stack, "ai-build", "admin.vm.property.Set", "template", before.encode())
        dom0_admin(stack, READ_TEMPLATE, "admin.vm.tag.Remove", "ai-exec")
