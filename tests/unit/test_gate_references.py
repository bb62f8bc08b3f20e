"""Authority over a qube's root is authority over the qube (issue 7 §3).

A property that makes one qube depend on another may name only a qube whose tier reaches what
the dependency confers, capped by the tier on the referencing qube
(``operations.REFERENCES``, ``reference_needs``). Checked for every reference property the
agent may write and for every create path (a new qube's references, as R4.3 builds them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from qubes_mcp.dom0.decide import VM_PROPERTIES, Verdict
from qubes_mcp.dom0.errors import GateError, InsufficientTierError, NotAllowedError, NotFoundError
from qubes_mcp.dom0.facts import Prop, QubeFacts
from qubes_mcp.dom0.operations import (
    REFERENCES,
    REFERENCES_BY_PROPERTY,
    reference_needs,
)
from qubes_mcp.dom0.tiers import Tier
from qubes_mcp.sim.qubesd.props import CLASS_PROPS
from tests.gate_fixtures import CONFIG_TEXT, config, decide_request, qube

#: the shared test configuration, with room for the extra qubes these tests add to the scope
CFG = config(CONFIG_TEXT.replace("max_qubes = 12", "max_qubes = 100"))
AGENT = CFG.principals["mcp-control"]


def run(op: str, target: str, extra: Any = (), **args: Any) -> Verdict:
    return decide_request(CFG, op, target, principal=AGENT, extra=extra, **args)


def refusal(exc_type: type[GateError], *a: Any, **kw: Any) -> GateError:
    with pytest.raises(exc_type) as info:
        run(*a, **kw)
    return info.value


TIER_TAGS = {Tier.READ: (), Tier.EXEC: ("ai-exec",), Tier.NET: ("ai-net",), Tier.FULL: ("ai-full",)}


def at(tier: Tier, name: str, klass: str = "AppVM", **props: str) -> QubeFacts:
    return qube(name, "ai-managed", *TIER_TAGS[tier], klass=klass, **props)


def with_default(facts: QubeFacts, prop: str, value: str) -> QubeFacts:
    """``facts`` with ``prop`` at its default (R4.3 copies only explicitly set properties)."""
    props = dict(facts.props)
    props[prop] = Prop(True, "vm", value)
    return dataclasses.replace(facts, props=props)


# --- the table ---------------------------------------------------------------------------------


def test_the_table_knows_every_vm_valued_property_of_a_qube() -> None:
    """Every VM-valued property of every R4.3 qube class (as the emulated qubesd defines them,
    from ``qubes/vm/*.py``) has a row; ``relayvm`` is R4.3's RemoteVM's."""
    emulated = {p.name for props in CLASS_PROPS.values() for p in props if p.kind == "vm"}
    assert emulated <= set(REFERENCES_BY_PROPERTY)
    assert set(REFERENCES_BY_PROPERTY) == {
        "template",
        "default_dispvm",
        "management_dispvm",
        "netvm",
        "guivm",
        "audiovm",
        "relayvm",
    }
    assert len(REFERENCES) == len(REFERENCES_BY_PROPERTY)


def test_every_writable_reference_property_is_governed_by_the_table() -> None:
    assert {"template", "default_dispvm", "netvm"} == VM_PROPERTIES


@pytest.mark.parametrize("referencing", list(Tier))
@pytest.mark.parametrize("ref", REFERENCES, ids=lambda r: r.prop)
def test_a_dependency_never_needs_more_than_the_referencing_tier(
    ref: Any, referencing: Tier
) -> None:
    assert reference_needs(ref.prop, referencing) == min(referencing, ref.confers)


# --- property.set: every writable reference property ---------------------------------------------

TEMPLATES = {t: at(t, f"ai-tpl-{t.word}", klass="TemplateVM") for t in Tier}
DVMS = {t: at(t, f"ai-dvm-{t.word}", template_for_dispvms="True") for t in Tier}


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_template_may_name_only_a_template_of_exec_or_more(tier: Tier) -> None:
    """The issue's attack: a template the agent may only read as the root of a full qube."""
    tpl = TEMPLATES[tier]
    args = {"property": "template", "value": tpl.name}
    if tier < Tier.EXEC:
        exc = refusal(InsufficientTierError, "property.set", "ai-build", extra=[tpl], **args)
        assert "template may only name a qube of tier exec or more" in exc.message
    else:
        assert run("property.set", "ai-build", extra=[tpl], **args).args["value"] == tpl.name


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_default_dispvm_may_name_only_a_disposable_template_of_exec_or_more(tier: Tier) -> None:
    dvm = DVMS[tier]
    args = {"property": "default_dispvm", "value": dvm.name}
    if tier < Tier.EXEC:
        refusal(InsufficientTierError, "property.set", "ai-build", extra=[dvm], **args)
    else:
        run("property.set", "ai-build", extra=[dvm], **args)


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_netvm_confers_no_tier_only_the_egress_rule_applies(tier: Tier) -> None:
    egress = at(tier, "ai-egress", provides_network="True", netvm="sys-firewall")
    offline = qube("ai-build", "ai-managed", "ai-full", netvm="")
    verdict = run(
        "property.set", "ai-build", extra=[egress, offline], property="netvm", value="ai-egress"
    )
    assert verdict.args["value"] == "ai-egress"


@pytest.mark.parametrize("prop", sorted(VM_PROPERTIES))
def test_out_of_scope_references_stay_the_one_not_found(prop: str) -> None:
    offline = qube("ai-build", "ai-managed", "ai-full", netvm="")
    for hidden in ("debian-13-xfce", "vault", "ai-secret", "no-such-qube"):
        refusal(
            NotFoundError, "property.set", "ai-build", extra=[offline], property=prop, value=hidden
        )


# --- create paths ------------------------------------------------------------------------------

DISPOSABLE_OPS = ["disposable.create", "disposable.run"]


def _disposable(op: str, dvm: QubeFacts, *extra: QubeFacts) -> Any:
    args: dict[str, Any] = {"command": ["true"]} if op == "disposable.run" else {}
    return run(op, dvm.name, extra=[dvm, *extra], **args)


def _disposable_refused(op: str, dvm: QubeFacts, *extra: QubeFacts) -> NotAllowedError:
    with pytest.raises(NotAllowedError) as caught:
        _disposable(op, dvm, *extra)
    return caught.value


@pytest.mark.parametrize("op", DISPOSABLE_OPS)
@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_a_disposable_runs_its_templates_root_only_if_that_reaches_the_rule(
    op: str, tier: Tier
) -> None:
    """The disposable's root filesystem is its dvm template's template."""
    dvm = at(Tier.EXEC, "ai-dvm2", template_for_dispvms="True", template=TEMPLATES[tier].name)
    if tier < Tier.EXEC:
        exc = _disposable_refused(op, dvm, TEMPLATES[tier])
        assert "ai-tpl-read (template)" in exc.message
    else:
        assert _disposable(op, dvm, TEMPLATES[tier]).birth is not None


@pytest.mark.parametrize("op", DISPOSABLE_OPS)
@pytest.mark.parametrize("prop", ["default_dispvm", "management_dispvm", "guivm", "audiovm"])
def test_a_disposable_inherits_its_templates_explicit_references_under_the_rule(
    op: str, prop: str
) -> None:
    low = DVMS[Tier.READ]
    dvm = at(Tier.EXEC, "ai-dvm2", template_for_dispvms="True", **{prop: low.name})
    exc = _disposable_refused(op, dvm, low)
    assert f"ai-dvm-read ({prop})" in exc.message
    # the same reference at its default is not copied into the disposable (R4.3 clones only
    # explicitly set properties)
    assert _disposable(op, with_default(dvm, prop, low.name), low).birth is not None
    # a referenced qube at the disposable's own tier is fine, whatever the dependency confers
    same = DVMS[Tier.EXEC]
    assert _disposable(
        op, at(Tier.EXEC, "ai-dvm2", template_for_dispvms="True", **{prop: same.name}), same
    ).birth


@pytest.mark.parametrize("op", DISPOSABLE_OPS)
def test_the_operators_own_wiring_outside_the_scope_is_carried(op: str) -> None:
    """A reference outside the scope can only be the operator's (an agent cannot name such a
    qube): the demo's dvm template runs on the operator's shared template."""
    dvm = at(Tier.EXEC, "ai-dvm2", template_for_dispvms="True", template="debian-13-xfce")
    assert _disposable(op, dvm).birth is not None


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_a_clone_keeps_its_sources_template_only_under_the_rule(tier: Tier) -> None:
    source = at(Tier.FULL, "ai-src", template=TEMPLATES[tier].name, netvm="")
    if tier < Tier.EXEC:
        with pytest.raises(NotAllowedError) as caught:
            run("qube.clone", "ai-src", extra=[source, TEMPLATES[tier]], name="ai-copy")
        assert "ai-tpl-read (template)" in caught.value.message
    else:
        run("qube.clone", "ai-src", extra=[source, TEMPLATES[tier]], name="ai-copy")
    outside = at(Tier.FULL, "ai-src", template="debian-13-xfce", netvm="")
    run("qube.clone", "ai-src", extra=[outside], name="ai-copy")


@pytest.mark.parametrize("tier", list(Tier), ids=lambda t: t.word)
def test_create_from_a_template_depends_on_it_at_its_own_tier(tier: Tier) -> None:
    tpl = TEMPLATES[tier]
    if tier < Tier.EXEC:  # the operation itself needs exec on the template
        refusal(InsufficientTierError, "qube.create", tpl.name, extra=[tpl], name="ai-n")
    else:
        birth = run("qube.create", tpl.name, extra=[tpl], name="ai-n").birth
        assert birth is not None and birth.tier == tier
