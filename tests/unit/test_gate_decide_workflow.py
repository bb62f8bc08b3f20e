"""The decisions an agent's research loop needs: remove what it created, and power states that
qubesd would refuse decided before the operator is asked.

Each case is "a valid request, one targeted mutation, expect this decision". The facts carry
what the gate's reader and the registry say (``by`` is the registry's record of who registered
the qube under its current uuid); nothing in them is the agent's to write.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.decide import Verdict, created_by
from qubes_mcp.dom0.enrolment import Registry
from qubes_mcp.dom0.errors import InsufficientTierError, InvalidStateError, NotFoundError
from qubes_mcp.dom0.facts import Facts, QubeFacts
from qubes_mcp.dom0.operations import (
    OPERATIONS,
    OPERATIONS_BY_NAME,
    POWER_REFUSED,
    Operation,
    Power,
    Target,
)
from qubes_mcp.dom0.render import render_policy
from qubes_mcp.dom0.tiers import Tier
from tests.gate_fixtures import CONFIG_TEXT, config, decide_request, qube

CFG = config()
AGENT = CFG.principals["mcp-control"]
AUDITOR = CFG.principals["auditor"]
BORN = "gate:mcp-control"
OWNER = "ai-owner-mcp-control"


def mine(name: str = "ai-mine", *tags: str, by: str = BORN, **kw: Any) -> QubeFacts:
    """A qube the gate created for mcp-control from an exec template: exec tier, owner tag."""
    return replace(qube(name, "ai-managed", *(tags or ("ai-exec", OWNER)), **kw), by=by)


def run(
    op: str,
    target: str | None,
    extra: Any = (),
    *,
    principal: Any = AGENT,
    now: bool = True,
    cfg: Any = CFG,
    **args: Any,
) -> Verdict:
    return decide_request(cfg, op, target, principal=principal, extra=extra, now=now, **args)


# --- remove what you created ----------------------------------------------------------------


def test_a_principal_removes_a_qube_it_created_at_exec_with_consent() -> None:
    verdict = run("qube.remove", "ai-mine", [mine()])
    assert verdict.consent and "qube.remove needs consent" in verdict.consent_reasons
    assert verdict.tiers["ai-mine"] is Tier.EXEC


@pytest.mark.parametrize(
    ("why", "tags", "by"),
    [
        ("the operator enrolled it and tagged it as the agent's", ("ai-exec", OWNER), "operator"),
        ("another principal created it", ("ai-exec", "ai-owner-auditor"), "gate:auditor"),
        ("another principal's registration, this principal's tag", ("ai-exec", OWNER), "gate:x"),
        ("this principal's registration, another's tag", ("ai-exec", "ai-owner-auditor"), BORN),
        ("the operator took the owner tag away", ("ai-exec",), BORN),
        ("a tag that merely starts like the owner tag", ("ai-exec", OWNER + "2"), BORN),
        ("not looked up in the registry", ("ai-exec", OWNER), ""),
    ],
)
def test_anything_else_stays_full_only(why: str, tags: tuple[str, ...], by: str) -> None:
    with pytest.raises(InsufficientTierError) as exc:
        run("qube.remove", "ai-mine", [mine("ai-mine", *tags, by=by)])
    assert exc.value.message == "needs full on the target qube, you have exec", why


def test_exec_is_the_floor_even_on_a_qube_it_created() -> None:
    # the operator lowered it to read (no tier tag, default read): acting on it is gone too
    with pytest.raises(InsufficientTierError):
        run("qube.remove", "ai-mine", [mine("ai-mine", OWNER)])


def test_a_read_ceiling_cannot_remove_even_its_own() -> None:
    own = replace(qube("aud-x", "ai-managed", "ai-full", "ai-owner-auditor"), by="gate:auditor")
    assert created_by(AUDITOR, own)
    with pytest.raises(InsufficientTierError):
        run("qube.remove", "aud-x", [own], principal=AUDITOR)


def test_an_unregistered_qube_with_every_tag_is_not_found() -> None:
    forged = replace(mine(), registered=None)  # the tags a clone of it would carry
    with pytest.raises(NotFoundError):
        run("qube.remove", "ai-mine", [forged])


@pytest.mark.parametrize(
    "op",
    [
        o.name
        for o in OPERATIONS
        if o.target is Target.QUBE and o.needs > Tier.EXEC and o.creator_needs is None
    ],
)
def test_creating_a_qube_lowers_no_other_operation(op: str) -> None:
    args: dict[str, Any] = {
        "property": "label",
        "value": "red",
        "feature": "service.x",
        "rules": [],
        "backend": "ai-build",
        "device": "sda",
        "name": "ai-clone9",
    }
    fields = {f.name for f in OPERATIONS_BY_NAME[op].fields}
    with pytest.raises(InsufficientTierError):
        run(op, "ai-mine", [mine()], **{k: v for k, v in args.items() if k in fields})


def test_only_removal_has_a_creator_tier_and_never_below_exec() -> None:
    assert {o.name: o.creator_needs for o in OPERATIONS if o.creator_needs} == {
        "qube.remove": Tier.EXEC
    }
    base = OPERATIONS_BY_NAME["qube.remove"]
    for bad in (Tier.READ, Tier.FULL):
        with pytest.raises(ValueError, match="creator_needs"):
            replace(base, creator_needs=bad)


def test_the_registry_answers_who_registered_a_name_only_under_its_uuid() -> None:
    reg = Registry().enrolled("ai", "ai-mine", "u-1", "AppVM", by=BORN)
    assert reg.registrar("ai", "ai-mine", "u-1") == BORN
    assert reg.registrar("ai", "ai-mine", "u-2") is None  # removed and re-created: nothing
    assert reg.registrar("ai", "ai-mine", "") is None
    assert reg.registrar("other", "ai-mine", "u-1") is None
    q = replace(qube("ai-mine", "ai-managed", "ai-exec", OWNER), uuid="u-1")
    filled = Facts(qubes={"ai-mine": q, "gone": None}).with_registrars(
        lambda n, u: reg.registrar("ai", n, u)
    )
    assert filled.qubes["ai-mine"] is not None and filled.qubes["ai-mine"].by == BORN
    assert filled.qubes["gone"] is None
    stale = Facts(qubes={"ai-mine": replace(q, uuid="u-2")}).with_registrars(
        lambda n, u: reg.registrar("ai", n, u)
    )
    assert stale.qubes["ai-mine"] is not None and stale.qubes["ai-mine"].by == ""


def test_an_exec_ceiling_gets_the_remove_service_in_the_policy() -> None:
    # the policy lets a principal call what its ceiling can reach by some path; the gate
    # decides which qubes (here: only those it created)
    text = CONFIG_TEXT.replace('ceiling = "full"', 'ceiling = "exec"', 1)
    cfg = parse_config(text)
    reg = Registry().enrolled("ai", "ai-dev", "u-1", "AppVM", by="operator")
    lines = render_policy(cfg, reg).splitlines()
    assert any(line.startswith("qmcp.Remove ") and " mcp-control " in line for line in lines)
    assert not any(line.startswith("qmcp.SetProperty ") and "mcp-control" in line for line in lines)
    exec_agent = cfg.principals["mcp-control"]
    assert run("qube.remove", "ai-mine", [mine()], principal=exec_agent, cfg=cfg).consent


# --- power states qubesd would refuse, decided before consent ----------------------------------

UP = "Running"
#: (op, args, {qube: state}, refused?) -- one mutation each from an allowed request
POWER_CASES: list[tuple[str, dict[str, Any], dict[str, str], bool]] = [
    ("qube.remove", {}, {"ai-build": "Halted"}, False),
    ("qube.remove", {}, {"ai-build": UP}, True),
    ("qube.remove", {}, {"ai-build": "Paused"}, True),
    ("qube.remove", {}, {"ai-build": "NA"}, True),
    ("qube.remove", {}, {"ai-build": ""}, False),  # unknown: qubesd decides
    ("qube.revert", {"revision": None}, {"ai-build": "Halted"}, False),
    ("qube.revert", {"revision": "1"}, {"ai-build": UP}, True),
    ("qube.revert", {"revision": None}, {"ai-build": "Paused"}, True),
    ("qube.shutdown", {}, {"ai-build": UP}, False),
    ("qube.shutdown", {}, {"ai-build": "Halted"}, True),
    ("qube.shutdown", {}, {"ai-build": "Paused"}, True),
    ("qube.shutdown", {"force": True}, {"ai-build": "Paused"}, False),
    ("qube.kill", {}, {"ai-build": UP}, False),
    ("qube.kill", {}, {"ai-build": "Halted"}, True),
    ("qube.pause", {}, {"ai-build": UP}, False),
    ("qube.pause", {}, {"ai-build": "Halted"}, True),
    ("qube.unpause", {}, {"ai-build": "Paused"}, False),
    ("qube.unpause", {}, {"ai-build": UP}, True),
    ("property.set", {"property": "label", "value": "red"}, {"ai-build": UP}, False),
    (
        "property.set",
        {"property": "template", "value": "ai-fulltpl"},
        {"ai-build": UP},
        True,
    ),
    (
        "property.set",
        {"property": "template", "value": "ai-fulltpl"},
        {"ai-build": "Halted"},
        False,
    ),
    ("device.attach", {}, {"ai-build": UP, "ai-precious": UP}, False),
    ("device.attach", {}, {"ai-build": UP, "ai-precious": "Halted"}, True),
    ("device.attach", {}, {"ai-build": "Halted", "ai-precious": UP}, True),
    ("device.attach", {}, {"ai-build": UP, "ai-precious": "Paused"}, False),
    ("device.detach", {}, {"ai-build": UP, "ai-precious": UP}, False),
    ("device.detach", {}, {"ai-build": UP, "ai-precious": "Halted"}, True),
    ("device.detach", {}, {"ai-build": "Halted", "ai-precious": UP}, True),
]


def _states(states: dict[str, str]) -> list[QubeFacts]:
    fleet = {
        "ai-build": qube("ai-build", "ai-managed", "ai-full", netvm="ai-egress"),
        "ai-precious": qube("ai-precious", "ai-managed", "ai-full", netvm=""),
    }
    return [replace(fleet[name], state=state) for name, state in states.items()]


@pytest.mark.parametrize(("op", "args", "states", "refused"), POWER_CASES)
def test_a_state_qubesd_refuses_is_invalid_state_before_consent(
    op: str, args: dict[str, Any], states: dict[str, str], refused: bool
) -> None:
    if op.startswith("device."):
        args = {"backend": "ai-precious", "device": "sda", **args}
    extra = _states(states)
    if refused:
        with pytest.raises(InvalidStateError):
            run(op, "ai-build", extra, **args)
    else:
        run(op, "ai-build", extra, **args)
    # a plan's step is decided ahead: earlier steps change the states, so none is refused
    run(op, "ai-build", extra, now=False, **args)


def test_every_power_rule_of_the_table_has_a_case() -> None:
    covered = {
        (op, rule)
        for op, args, _, refused in POWER_CASES
        if refused
        for rule in OPERATIONS_BY_NAME[op].power
    }
    for o in OPERATIONS:
        for rule in o.power:
            assert (o.name, rule) in covered, (o.name, rule)


def test_the_attach_message_names_the_halted_backend() -> None:
    extra = _states({"ai-build": UP, "ai-precious": "Halted"})
    with pytest.raises(InvalidStateError) as info:
        run("device.attach", "ai-build", extra, backend="ai-precious", device="sda")
    assert info.value.message.startswith("the backend is not running")
    assert info.value.to_reply()["error"]["code"] == "invalid-state"


def test_scope_and_tier_come_before_the_power_state() -> None:
    # a hidden qube stays the one not-found, a too-low tier stays insufficient-tier, whatever
    # state they are in: the state of a qube is only told to whoever may act on it
    with pytest.raises(NotFoundError):
        run("qube.remove", "vault", [qube("vault", state=UP)])
    with pytest.raises(InsufficientTierError):
        run("qube.kill", "ai-notes", [qube("ai-notes", "ai-managed", state="Halted")])


def test_power_predicates_refuse_only_what_qubesd_surely_refuses() -> None:
    assert [s for s in ("Halted", "Running", "Paused", "") if POWER_REFUSED["running"](s)] == [
        "Halted"
    ]
    assert not any(POWER_REFUSED[k]("") for k in POWER_REFUSED)
    with pytest.raises(ValueError, match="power state"):
        Operation("x.y", "qmcp.X", "x", Target.QUBE, Tier.EXEC, power=(Power("", "asleep", "m"),))
