"""The decision: may this principal do this operation with these arguments, on this fleet?

``decide`` is pure: it takes the request (already schema-checked), the facts read fresh from
qubesd, and the configuration, and returns a :class:`Verdict` or raises a
:class:`~qubes_mcp.dom0.errors.GateError`. The order of checks is part of the contract,
because each step may only reveal what the previous steps proved the agent may see:

1. The caller must be a configured principal (else ``not-found``).
2. Every qube the request names must exist *and* be in the principal's scope (a copy may also
   land in the scope's dump sink). Missing and out-of-scope raise the same ``NotFoundError``,
   in the same order, so neither the message nor the sequence of reads differs.
3. The effective tier — min(tier tags, ceiling) — on each of them must reach what the
   operation needs there (``insufficient-tier``; those qubes are known to the agent). On its
   target, an operation with ``creator_needs`` (``qube.remove``) needs only that on a qube the
   principal created (``created_by``: dom0's registry and the owner tag, never anything the
   agent controls).
4. The operation's invariants (``not-allowed``): property and feature allowlists, netvm may be
   disconnected but never retargeted, no template/standalone creation, no clone of templates or
   network providers, only templates are updated and only in a scope with an egress,
   cross-references stay in scope and reach the tier their dependency
   confers (``operations.REFERENCES``; a new qube's references too), the principal may create.
5. Budgets for create paths (``budget-exceeded``) and name collisions with a qube of the
   principal's scope (``conflict``); a hidden qube's name is answered as a free name until the
   act itself fails (no existence oracle before the act).
6. Power states qubesd insists on (``operations.Power``; ``invalid-state``), so a request it
   would refuse never waits for the operator first. Skipped for a plan's steps decided ahead.
7. Consent: the table's default, the operator's per-operation list, and guarded qubes.

Nothing here allows by default: an operation the table does not know never reaches this
function, and every branch that is not an explicit pass raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qubes_mcp.dom0.config import GateConfig, Principal
from qubes_mcp.dom0.errors import (
    BudgetExceededError,
    ConflictError,
    InsufficientTierError,
    InvalidInputError,
    InvalidStateError,
    NotAllowedError,
    NotFoundError,
)
from qubes_mcp.dom0.facts import Facts, QubeFacts
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.operations import (
    OPERATIONS_BY_NAME,
    POWER_REFUSED,
    REFERENCES_BY_PROPERTY,
    Operation,
    Target,
    reference_needs,
)
from qubes_mcp.dom0.tiers import Tier, effective_tier

#: VM-valued properties an agent may write: the writable ones the reference table knows
VM_PROPERTIES = frozenset(
    next(f for f in OPERATIONS_BY_NAME["property.set"].fields if f.name == "property").choices
) & frozenset(REFERENCES_BY_PROPERTY)
#: feature names an agent may write: in-qube service toggles and qubesdb config for the qube
WRITABLE_FEATURE_PREFIXES = ("service.", "vm-config.")
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
_INT_BOUNDS = {"memory": (200, 65536), "maxmem": (0, 65536), "vcpus": (1, 64)}
_BOOLS = {"true": "True", "false": "False", "1": "True", "0": "False"}


@dataclass(frozen=True)
class Birth:
    """How the gate creates a qube: what it is, the tags it gets, its network."""

    name: str
    source: str
    klass: str  #: "AppVM" or "DispVM"
    label: str
    tier: Tier
    stamp: frozenset[str]
    netvm: str | None
    private_size: int | None
    template_for_dispvms: bool
    estimate: int


@dataclass(frozen=True)
class Verdict:
    op: Operation
    principal: Principal
    target: str | None
    args: Mapping[str, Any]
    tiers: Mapping[str, Tier]
    consent: bool
    consent_reasons: tuple[str, ...] = ()
    birth: Birth | None = None


#: operations whose decision, consent text and handler never look at a qube's volume sizes
#: (``QubeFacts.footprint``/``private_size``: budgets, births, clones, Info, a removal's
#: consent text), so their facts skip ``admin.vm.volume.Info``: one qubesd round trip per
#: named in-scope qube, on the path of every command an agent runs (issue 8)
SIZELESS = frozenset({"qube.run", "file.read", "file.write"})


def needs_sizes(op: Operation) -> bool:
    """Whether deciding and doing ``op`` reads volume sizes (see :data:`SIZELESS`)."""
    return op.name not in SIZELESS


def names_to_read(op: Operation, target: str | None, args: Mapping[str, Any]) -> list[str]:
    """Every qube name the decision will look at, in the order it looks at them."""
    names = [] if target is None else [target]
    names += [args[ref.field] for ref in op.refs if args.get(ref.field) is not None]
    if op.name == "property.set" and args["property"] in VM_PROPERTIES and args["value"]:
        names.append(args["value"])
    if op.creates and args.get("name"):
        names.append(args["name"])
    return names


def _in_scope(principal: Principal, facts: QubeFacts | None, config: GateConfig) -> Tier:
    """Step 2 for one qube: its effective tier, or the one not-found refusal."""
    if facts is None:
        raise NotFoundError(reason="no such qube")
    tier = effective_tier(
        principal.scope, facts.tags, facts.registered, config.default_tier, principal.ceiling
    )
    if tier is None:
        raise NotFoundError(reason=f"{facts.name} is not enrolled in {principal.scope.prefix}")
    return tier


def _visible(principal: Principal, facts: QubeFacts, config: GateConfig) -> bool:
    """Whether the principal can see this qube at all: a member of its scope, or its dump."""
    scope = principal.scope
    return scope.is_dump_sink(facts.tags, facts.registered) or (
        effective_tier(scope, facts.tags, facts.registered, config.default_tier, principal.ceiling)
        is not None
    )


def created_by(principal: Principal, q: QubeFacts) -> bool:
    """THE "you created it" predicate: dom0's registry says the gate registered this qube (under
    its current uuid) for ``principal`` at its birth, **and** it carries the principal's owner
    tag. Both are dom0's own records -- an agent writes neither tags nor the registry -- and
    both are needed: the operator can tag a qube by hand or enrol it (``by: operator``), and
    Qubes copies tags into clones and disposables, none of which the principal created."""
    return q.by == principal.scope.born_by(principal.qube) and (
        principal.scope.owner(principal.qube) in q.tags
    )


def target_needs(op: Operation, principal: Principal, q: QubeFacts) -> Tier:
    """What ``op`` needs on its target ``q``: the table's ``needs``, or its ``creator_needs``
    on a qube the principal created (``created_by``)."""
    if op.creator_needs is not None and created_by(principal, q):
        return min(op.needs, op.creator_needs)
    return op.needs


def _check_power(op: Operation, target: str | None, args: Mapping[str, Any], facts: Facts) -> None:
    """The table's power preconditions (``operations.Power``), from the states just read."""
    for rule in op.power:
        if rule.when is not None and args.get(rule.when[0]) != rule.when[1]:
            continue
        q = facts.get(target if not rule.qube else args.get(rule.qube))
        if q is not None and POWER_REFUSED[rule.state](q.state):
            raise InvalidStateError(
                rule.message, reason=f"{rule.qube or 'target'} is {q.state}, not {rule.state}"
            )


def _need(tier: Tier, needs: Tier, role: str) -> None:
    if tier < needs:
        raise InsufficientTierError(
            f"needs {needs.word} on the {role}, you have {tier.word}",
            reason=f"{role} tier {tier.word} < {needs.word}",
        )


def _check_reference(
    principal: Principal,
    config: GateConfig,
    prop: str,
    referencing: Tier,
    ref: QubeFacts | None,
) -> None:
    """The reference rule for a property the agent sets: the referenced qube is in scope, and
    its tier reaches what the dependency confers (``operations.REFERENCES``)."""
    tier = _in_scope(principal, ref, config)
    needs = reference_needs(prop, referencing)
    if tier < needs:
        raise InsufficientTierError(
            f"{prop} may only name a qube of tier {needs.word} or more; it is {tier.word}",
            reason=f"{prop} reference tier {tier.word} < {needs.word}",
        )


def _check_property(
    principal: Principal,
    config: GateConfig,
    qube: QubeFacts,
    args: dict[str, Any],
    facts: Facts,
    *,
    tier: Tier,
) -> None:
    prop, value = args["property"], args["value"]
    if prop in VM_PROPERTIES:
        if value in (None, ""):
            args["value"] = None
        elif not is_valid_qube_name(value):
            raise InvalidInputError("value must be a qube name or null")
    if prop == "netvm":
        if qube.flag("provides_network") or qube.name in config.egress_qubes:
            raise NotAllowedError("the netvm of a network-providing qube is operator-only")
        if args["value"] is None:
            return  # disconnecting is always allowed
        _check_reference(principal, config, prop, tier, facts.get(args["value"]))
        current, egress = qube.prop("netvm"), principal.egress_qube
        if args["value"] != egress or current not in ("", egress):
            raise NotAllowedError(
                "netvm can be set to null, or back to the egress qube from null; "
                "connecting elsewhere is operator-only"
            )
        return
    if prop == "default_dispvm":
        if args["value"] is None:
            return
        ref = facts.get(args["value"])
        _check_reference(principal, config, prop, tier, ref)
        assert ref is not None
        if not ref.flag("template_for_dispvms"):
            raise NotAllowedError("default_dispvm must be a disposable template in your scope")
        return
    if prop == "template":
        if args["value"] is None:
            raise InvalidInputError("template cannot be null")
        ref = facts.get(args["value"])
        _in_scope(principal, ref, config)
        assert ref is not None
        if ref.klass != "TemplateVM" or qube.klass != "AppVM":
            raise NotAllowedError("template must be a template in your scope, on an app qube")
        _check_reference(principal, config, prop, tier, ref)
        return
    if value is None:
        raise InvalidInputError("value cannot be null for this property")
    if prop == "label":
        if value not in LABELS:
            raise InvalidInputError(f"label must be one of: {', '.join(LABELS)}")
    elif prop in _INT_BOUNDS:
        low, high = _INT_BOUNDS[prop]
        if not value.isdigit() or not low <= int(value) <= high:
            raise InvalidInputError(f"{prop} must be an integer between {low} and {high}")
        args["value"] = str(int(value))
    elif prop in ("autostart", "template_for_dispvms"):
        if value.lower() not in _BOOLS:
            raise InvalidInputError(f"{prop} must be true or false")
        args["value"] = _BOOLS[value.lower()]
        if prop == "template_for_dispvms" and qube.klass != "AppVM":
            raise NotAllowedError("only an app qube can be a disposable template")
    else:  # the schema's choices and this function must agree
        raise NotAllowedError("property is not writable")


def _check_update(principal: Principal, template: QubeFacts) -> None:
    """``template.update``: a template, and a scope with an egress for its updates to go
    through (the generated policy sends its ``qubes.UpdatesProxy`` there and nowhere else)."""
    if template.klass != "TemplateVM":
        raise NotAllowedError("only a template can be updated")
    if principal.egress_qube is None:
        raise NotAllowedError("your scope has no egress qube, so templates cannot be updated")


def _birth_netvm(
    principal: Principal, config: GateConfig, source: QubeFacts | None, facts: Facts, network: str
) -> str | None:
    """The documented inheritance rule for a new qube's netvm (docs/architecture-gate.md)."""
    if network == "none":
        return None
    if source is not None:  # clone or disposable: the source's own network, if it stays in scope
        inherited = source.prop("netvm")
        if not inherited:
            return None
        via = facts.get(inherited)
        if (
            via is None
            or effective_tier(
                principal.scope, via.tags, via.registered, config.default_tier, principal.ceiling
            )
            is None
        ):
            raise NotAllowedError("the source's network is outside your scope")
        return inherited
    if principal.egress_qube is None:
        return None
    egress = facts.get(principal.egress_qube)
    if egress is None or not principal.scope.is_enrolled(egress.tags, egress.registered):
        raise NotAllowedError("the configured egress qube is not in your scope")
    return principal.egress_qube


def _birth_references(op: Operation, source: QubeFacts, netvm: str | None) -> list[tuple[str, str]]:
    """Every (property, qube) the new qube will depend on, as R4.3 builds it.

    - from a template: ``template`` is that template;
    - a disposable: ``template`` is the disposable template, and R4.3 copies every reference
      set explicitly on it (``qubes/vm/dispvm.py``: properties marked ``clone``), its own
      ``template`` among them — the disposable's root filesystem comes from there;
    - a clone: the source's ``template`` (the gate copies no other reference);
    - and the ``netvm`` the gate decided.
    """
    if op.name == "qube.create":
        refs = [("template", source.name)]
    elif op.name in ("disposable.create", "disposable.run"):
        refs = [("template", source.name)]
        for prop in REFERENCES_BY_PROPERTY:
            p = source.props.get(prop)
            if prop != "netvm" and p is not None and not p.is_default and p.value:
                refs.append((prop, p.value))
    else:  # qube.clone
        refs = [("template", source.prop("template"))]
    if netvm:
        refs.append(("netvm", netvm))
    return [(prop, name) for prop, name in refs if name]


def _check_birth_references(
    principal: Principal,
    config: GateConfig,
    tier: Tier,
    refs: list[tuple[str, str]],
    facts: Facts,
) -> None:
    """The reference rule at birth, for a new qube of ``tier``.

    A reference to a qube of the scope must meet the rule, whoever made it (the agent under an
    earlier tier, or the operator). A reference to a qube outside the scope is the operator's
    own wiring — an agent can never name such a qube — and the source already depends on it
    at the same tier, so the copy hands over nothing new: it is carried as it is (the netvm
    has its own, stricter rule in ``_birth_netvm``).
    """
    for prop, name in refs:
        ref = facts.get(name)  # creates read every enrolled qube of the scope
        if ref is None:
            continue
        ref_tier = effective_tier(
            principal.scope, ref.tags, ref.registered, config.default_tier, principal.ceiling
        )
        if ref_tier is None:
            continue
        needs = reference_needs(prop, tier)
        if ref_tier < needs:
            raise NotAllowedError(
                f"the new qube would depend on {name} ({prop}), whose tier {ref_tier.word} "
                f"is below {needs.word}",
                reason=f"birth {prop} reference tier {ref_tier.word} < {needs.word}",
            )


def _plan_birth(
    *,
    principal: Principal,
    config: GateConfig,
    op: Operation,
    source: QubeFacts,
    source_tier: Tier,
    args: Mapping[str, Any],
    facts: Facts,
) -> Birth:
    if not principal.may_create:
        raise NotAllowedError("you may not create qubes")
    if op.name == "qube.create":
        if source.klass != "TemplateVM":
            raise NotAllowedError("a qube can only be created from a template")
        klass, inherit_from = "AppVM", None
        private = args.get("private_size")
        estimate = private or config.budget.default_private
    elif op.name in ("disposable.create", "disposable.run"):
        if source.klass != "AppVM" or not source.flag("template_for_dispvms"):
            raise NotAllowedError("a disposable needs a disposable template")
        if source.flag("provides_network"):
            # R4.3 copies provides_network (a clone property) into every disposable: it would
            # be born a network provider, which no create path may make (docs/decisions/0008)
            raise NotAllowedError("a network-providing qube cannot be a disposable's template")
        klass, inherit_from, private = "DispVM", source, None
        estimate = max(source.private_size, config.budget.default_private)
    else:  # qube.clone
        if source.klass != "AppVM":
            raise NotAllowedError("only app qubes can be cloned")
        if source.flag("provides_network"):
            raise NotAllowedError("a network-providing qube cannot be cloned")
        klass, inherit_from, private = "AppVM", source, None
        estimate = max(source.footprint, source.private_size)
    # step 4 before step 5: the network and every dependency of the new qube
    netvm = _birth_netvm(principal, config, inherit_from, facts, args.get("network", "inherit"))
    _check_birth_references(
        principal, config, source_tier, _birth_references(op, source, netvm), facts
    )
    name = args.get("name")
    holder = facts.get(name)
    if holder is not None and _visible(principal, holder, config):
        # only a holder the principal can see collides here. A hidden qube of that name
        # (the operator's, not enrolled) is answered exactly as a free name until the act:
        # qubesd then refuses the create (R4.3 ``_vm_create``: QubesValueError "already
        # exists"), which the gate answers without qubesd's text. Refusing it here instead
        # would tell the agent that a qube it may not see exists.
        raise ConflictError(reason="name collision inside the principal's prefix")
    if private is not None and private > config.budget.private_cap:
        raise BudgetExceededError("private_size is above the per-qube cap")
    if len(facts.scope_qubes) >= config.budget.max_qubes:
        raise BudgetExceededError("you already have the maximum number of qubes")
    used = sum(q.footprint for q in facts.scope_qubes)
    if used + estimate > config.budget.pool_cap:
        raise BudgetExceededError("the pool budget would be exceeded")
    scope = principal.scope
    stamp = {scope.managed, scope.owner(principal.qube)}
    tier_tag = scope.tier_tag(source_tier)
    if tier_tag is not None:
        stamp.add(tier_tag)
    if scope.guarded in source.tags or source.name in config.consent.guarded:
        # a restriction that a create could strip would launder the guarded qube's data into
        # an unguarded copy: what is born of a guarded qube is guarded too
        stamp.add(scope.guarded)
    return Birth(
        name=name or "",
        source=source.name,
        klass=klass,
        label=args.get("label") or source.prop("label") or "gray",
        tier=source_tier,
        stamp=frozenset(stamp),
        netvm=netvm,
        private_size=private,
        template_for_dispvms=bool(args.get("disposable_template")),
        estimate=estimate,
    )


def _consent(
    op: Operation, config: GateConfig, principal: Principal, touched: list[QubeFacts]
) -> tuple[str, ...]:
    reasons = []
    if op.consent:
        reasons.append(f"{op.name} needs consent")
    if op.name in config.consent.operations:
        reasons.append(f"the operator asks to confirm {op.name}")
    if op.state_changing:
        for q in touched:
            if q.name in config.consent.guarded or principal.scope.guarded in q.tags:
                reasons.append(f"{q.name} is guarded")
    return tuple(reasons)


def decide(
    *,
    principal: Principal | None,
    op: Operation,
    target: str | None,
    args: Mapping[str, Any],
    facts: Facts,
    config: GateConfig,
    now: bool = True,
) -> Verdict:
    """Decide one request; see the module docstring for the order of checks.

    ``now``: the request acts right after this decision, so the power states just read are
    the ones qubesd will meet (step 6). A plan's steps are decided ahead (``now=False``):
    earlier steps change the states, and each step is decided again, now, when it runs."""
    if principal is None:
        raise NotFoundError(reason="caller is not a configured principal")
    work_args = dict(args)
    tiers: dict[str, Tier] = {}
    touched: list[QubeFacts] = []
    target_facts: QubeFacts | None = None
    if op.target is Target.QUBE:
        if target is None:
            raise NotFoundError(reason="no target qube")
        target_facts = facts.get(target)
        tiers[target] = _in_scope(principal, target_facts, config)
        assert target_facts is not None
        touched.append(target_facts)
    for ref in op.refs:
        name = work_args.get(ref.field)
        if name is None:
            continue
        ref_facts = facts.get(name)
        if (
            ref.allow_dump
            and ref_facts is not None
            and principal.scope.is_dump_sink(ref_facts.tags, ref_facts.registered)
        ):
            tiers[name] = ref.needs  # a sink accepts copies and nothing else
        else:
            tiers[name] = _in_scope(principal, ref_facts, config)
        assert ref_facts is not None
        touched.append(ref_facts)
        if name == target:
            raise InvalidInputError(f"{ref.field} must be a different qube")
    if target is not None and target in tiers:
        assert target_facts is not None
        _need(tiers[target], target_needs(op, principal, target_facts), "target qube")
    for ref in op.refs:
        name = work_args.get(ref.field)
        if name is not None:
            _need(tiers[name], ref.needs, ref.field)
    birth = None
    if op.name == "property.set":
        assert target_facts is not None
        _check_property(
            principal, config, target_facts, work_args, facts, tier=tiers[target_facts.name]
        )
    elif op.name == "feature.set":
        if not work_args["feature"].startswith(WRITABLE_FEATURE_PREFIXES):
            raise NotAllowedError("only service.* and vm-config.* features are writable by agents")
    elif op.name == "device.attach" and work_args["devclass"] != "block" and work_args["read_only"]:
        raise InvalidInputError("read_only: only block devices attach read-only")
    elif op.name == "template.update":
        assert target_facts is not None
        _check_update(principal, target_facts)
    elif op.creates:
        assert target_facts is not None and target is not None
        birth = _plan_birth(
            principal=principal,
            config=config,
            op=op,
            source=target_facts,
            source_tier=tiers[target],
            args=work_args,
            facts=facts,
        )
    if now:
        _check_power(op, target, work_args, facts)
    reasons = _consent(op, config, principal, touched)
    return Verdict(op, principal, target, work_args, tiers, bool(reasons), reasons, birth)
