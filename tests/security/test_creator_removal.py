"""Removing what you created: the gate decides "you created it" from dom0's own records only.

A principal may remove, at exec (with the operator's approval, as every removal), a qube whose
registry entry says the gate registered it for that principal at its birth (``by:
gate:<principal>``, under its current uuid) **and** that carries the principal's owner tag.
An agent can write neither. Every other qube stays full-only, and is refused before the
operator is asked:

- a qube the operator enrolled and tagged with the agent's owner tag by hand;
- a qube another principal created (its registration and its owner tag);
- a qube the gate created for this principal whose owner tag the operator took away.

And a removal takes the qube out of the registry and its lines out of the policy.

Run end to end on the emulator: operator actions go straight to qubesd (or to the registry, as
``qubes-mcp-admin`` would) as dom0.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qubes_mcp.dom0.config import load_config
from qubes_mcp.dom0.enrolment import Registry, commit, registry_path
from qubes_mcp.dom0.render import POLICY_NAME, render_policy
from qubes_mcp.stack import Stack, start_stack
from tests.enrolment_helpers import enrol
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

POLICY = f"etc/qubes/policy.d/{POLICY_NAME}"
OWNER = "ai-owner-mcp-control"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("creator") / "root")
    try:
        yield s
    finally:
        s.stop()


def _registry(stack: Stack) -> Registry:
    return Registry.load(registry_path(load_config(stack.config).paths.state_dir))


def _rewrite_by(stack: Stack, name: str, by: str) -> None:
    """The operator rewrites who registered ``name`` (same uuid), as dom0 may."""
    cfg = load_config(stack.config)

    def change(registry: Registry) -> Registry:
        entry = registry.entry("ai", name)
        assert entry is not None
        return registry.unenrolled("ai", name).enrolled(
            "ai", name, entry.uuid, entry.klass, role=entry.role, by=by
        )

    commit(cfg.paths.state_dir, cfg.paths.policy_dir, change, lambda r: render_policy(cfg, r))


def _create(stack: Stack, name: str) -> None:
    made = ok(gate_call(stack, "ai-debian", "qmcp.Create", {"name": name}))
    assert made["tier"] == "exec"
    entry = _registry(stack).entry("ai", name)
    assert entry is not None and entry.by == "gate:mcp-control"
    assert OWNER in dom0_admin(stack, name, "admin.vm.tag.List").split()


def _refused_before_consent(stack: Stack, name: str) -> None:
    reply = gate_call(stack, name, "qmcp.Remove")
    assert code(reply) == "insufficient-tier", reply
    assert reply["error"]["message"] == "needs full on the target qube, you have exec"
    line = [x for x in audit_lines(stack) if x["op"] == "qube.remove"][-1]
    assert (line["decision"], line["outcome"], line["targets"]) == ("refused", "not-run", [name])
    assert "consent" not in line["detail"] and "consent_id" not in line["detail"]
    assert name in _policy(stack).split()  # still there, still enrolled


def _policy(stack: Stack) -> str:
    return (stack.root / POLICY).read_text()


def test_a_qube_the_gate_created_is_removed_at_exec_with_consent_and_unregistered(
    stack: Stack,
) -> None:
    _create(stack, "ai-mine1")
    assert "ai-mine1" in _policy(stack).split()
    operator = answer_when_pending(stack, "approve", op="qube.remove")
    removed = ok(gate_call(stack, "ai-mine1", "qmcp.Remove"))
    operator.join(10)
    assert removed == {"qube": "ai-mine1", "removed": True}
    assert _registry(stack).entry("ai", "ai-mine1") is None
    assert "ai-mine1" not in _policy(stack).split()  # no policy line outlives the qube
    line = [x for x in audit_lines(stack) if x["op"] == "qube.remove"][-1]
    assert (line["outcome"], line["detail"]["consent"]) == ("ok", "approved")
    assert (line["detail"]["tier"], line["detail"]["tier_needed"]) == ("exec", "exec")


def test_a_denied_removal_removes_nothing(stack: Stack) -> None:
    _create(stack, "ai-mine2")
    operator = answer_when_pending(stack, "deny", op="qube.remove")
    assert code(gate_call(stack, "ai-mine2", "qmcp.Remove")) == "consent-denied"
    operator.join(10)
    assert _registry(stack).entry("ai", "ai-mine2") is not None


def test_the_operators_qube_with_the_agents_owner_tag_added_by_hand_stays_full_only(
    stack: Stack,
) -> None:
    dom0_admin(stack, "dom0", "admin.vm.Create.AppVM", "ai-debian", b"name=ai-byhand label=red")
    enrol(stack, "ai-byhand", "--tier", "exec")
    dom0_admin(stack, "ai-byhand", "admin.vm.tag.Set", OWNER)
    entry = _registry(stack).entry("ai", "ai-byhand")
    assert entry is not None and entry.by == "operator"
    _refused_before_consent(stack, "ai-byhand")


def test_another_principals_qube_stays_full_only(stack: Stack) -> None:
    _create(stack, "ai-theirs")
    _rewrite_by(stack, "ai-theirs", "gate:auditor")
    dom0_admin(stack, "ai-theirs", "admin.vm.tag.Remove", OWNER)
    dom0_admin(stack, "ai-theirs", "admin.vm.tag.Set", "ai-owner-auditor")
    _refused_before_consent(stack, "ai-theirs")
    # ... and with this principal's tag on it, but another's registration, still
    dom0_admin(stack, "ai-theirs", "admin.vm.tag.Set", OWNER)
    _refused_before_consent(stack, "ai-theirs")


def test_a_created_qube_whose_owner_tag_the_operator_removed_stays_full_only(
    stack: Stack,
) -> None:
    _create(stack, "ai-disowned")
    dom0_admin(stack, "ai-disowned", "admin.vm.tag.Remove", OWNER)
    _refused_before_consent(stack, "ai-disowned")


def test_a_running_qube_is_refused_before_the_operator_is_asked(stack: Stack) -> None:
    _create(stack, "ai-mine3")
    ok(gate_call(stack, "ai-mine3", "qmcp.Start"))
    reply = gate_call(stack, "ai-mine3", "qmcp.Remove")
    assert code(reply) == "invalid-state", reply
    assert reply["error"]["message"] == "the qube must be halted first"
    line = [x for x in audit_lines(stack) if x["op"] == "qube.remove"][-1]
    assert (line["decision"], line["outcome"]) == ("refused", "not-run")
    assert "consent_id" not in line["detail"]


def test_registrations_are_matched_by_uuid_not_name() -> None:
    # a name re-created by the operator has a new uuid: its old gate registration says nothing
    reg = Registry().enrolled("ai", "ai-x", "u-old", "AppVM", by="gate:mcp-control")
    assert reg.registrar("ai", "ai-x", "u-new") is None
    assert reg.registrar("ai", "ai-x", "u-old") == "gate:mcp-control"
