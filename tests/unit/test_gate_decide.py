"""The decision function against a fixed fleet: who may do what, and what is refused how.

Each hostile case is "a valid request, one targeted mutation, expect this refusal".
"""

from __future__ import annotations

from typing import Any

import pytest

from qubes_mcp.dom0.decide import Verdict, decide
from qubes_mcp.dom0.errors import (
    BudgetExceededError,
    ConflictError,
    GateError,
    InsufficientTierError,
    InvalidInputError,
    NotAllowedError,
    NotFoundError,
)
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME
from qubes_mcp.dom0.tiers import Tier
from tests.gate_fixtures import CONFIG_TEXT, config, decide_request, facts, qube

CFG = config()
AGENT = CFG.principals["mcp-control"]
AUDITOR = CFG.principals["auditor"]


def run(
    op: str, target: str | None, principal: Any = AGENT, extra: Any = (), **args: Any
) -> Verdict:
    return decide_request(CFG, op, target, principal=principal, extra=extra, **args)


def refusal(exc_type: type[GateError], *a: Any, **kw: Any) -> GateError:
    with pytest.raises(exc_type) as info:
        run(*a, **kw)
    return info.value


# --- promise 1: out of scope is indistinguishable from missing ---------------------------

HIDDEN = [
    "vault",
    "work",
    "sys-firewall",
    "debian-13-xfce",
    "dom0",
    "no-such-qube",
    "ai-secret",
    "ai-dump",
    "ai-hybrid",
]


@pytest.mark.parametrize("name", HIDDEN)
@pytest.mark.parametrize(
    "op",
    [
        "qube.info",
        "qube.start",
        "qube.run",
        "qube.remove",
        "firewall.set",
        "property.set",
        "qube.clone",
    ],
)
def test_hidden_targets_get_the_one_not_found(op: str, name: str) -> None:
    args: dict[str, Any] = {
        "command": ["true"],
        "rules": [],
        "property": "label",
        "value": "red",
        "name": "ai-x",
    }
    exc = refusal(
        NotFoundError,
        op,
        name,
        **{k: v for k, v in args.items() if k in {f.name for f in OPERATIONS_BY_NAME[op].fields}},
    )
    assert exc.to_reply() == NotFoundError().to_reply()


REF_PATHS = [
    ("file.copy", "ai-dev", "destination"),
    ("device.attach", "ai-build", "backend"),
    ("events.watch", None, "qube"),
]


@pytest.mark.parametrize(
    ("op", "target", "field", "name"),
    [
        (*path, name)
        for path in REF_PATHS
        for name in HIDDEN
        # the dump sink is a legal copy destination (tested on its own below)
        if not (path[0] == "file.copy" and name == "ai-dump")
    ],
)
def test_hidden_references_get_the_one_not_found(
    op: str, target: str | None, field: str, name: str
) -> None:
    args: dict[str, Any] = {field: name}
    if op == "file.copy":
        args["paths"] = ["/home/user/x"]
    if op == "device.attach":
        args["device"] = "sda"
    exc = refusal(NotFoundError, op, target, **args)
    assert exc.to_reply() == NotFoundError().to_reply()


@pytest.mark.parametrize("value", ["vault", "no-such-qube", "sys-firewall", "ai-secret"])
@pytest.mark.parametrize("prop", ["default_dispvm", "template", "netvm"])
def test_cross_references_out_of_scope_are_not_found(prop: str, value: str) -> None:
    target = "ai-build"
    with pytest.raises((NotFoundError, NotAllowedError)) as info:
        run("property.set", target, property=prop, value=value)
    if prop != "netvm":
        assert info.value.to_reply() == NotFoundError().to_reply()


def test_unknown_principal_is_refused_like_a_missing_qube() -> None:
    with pytest.raises(NotFoundError):
        run("qube.list", None, principal=None)


# --- promise 2: tiers, clamped by the ceiling ------------------------------------------------

TIER_OF = {"ai-notes": Tier.READ, "ai-dev": Tier.EXEC, "ai-web": Tier.NET, "ai-build": Tier.FULL}
NEEDS = {
    "qube.info": Tier.READ,
    "qube.start": Tier.EXEC,
    "qube.run": Tier.EXEC,
    "firewall.set": Tier.NET,
    "qube.remove": Tier.FULL,
}


@pytest.mark.parametrize("target", sorted(TIER_OF))
@pytest.mark.parametrize("op", sorted(NEEDS))
def test_each_operation_needs_its_tier(op: str, target: str) -> None:
    args: dict[str, Any] = {"command": ["id"]} if op == "qube.run" else {}
    if op == "firewall.set":
        args = {"rules": [{"action": "drop"}]}
    if TIER_OF[target] >= NEEDS[op]:
        assert run(op, target, **args).tiers[target] == TIER_OF[target]
    else:
        exc = refusal(InsufficientTierError, op, target, **args)
        assert NEEDS[op].word in exc.message


@pytest.mark.parametrize("target", ["ai-dev", "ai-web", "ai-build"])
def test_the_ceiling_clamps_every_tier(target: str) -> None:
    assert run("qube.info", target, principal=AUDITOR).tiers[target] == Tier.READ
    refusal(InsufficientTierError, "qube.start", target, principal=AUDITOR)


def test_untiered_qube_gets_the_default_tier() -> None:
    assert run("qube.info", "ai-notes").tiers["ai-notes"] == Tier.READ


def test_copy_needs_exec_on_both_ends() -> None:
    run("file.copy", "ai-dev", destination="ai-build", paths=["/tmp/x"])
    refusal(InsufficientTierError, "file.copy", "ai-dev", destination="ai-notes", paths=["/tmp/x"])
    refusal(InsufficientTierError, "file.copy", "ai-notes", destination="ai-dev", paths=["/tmp/x"])


def test_copy_into_the_dump_sink_is_allowed_and_out_of_it_is_not_found() -> None:
    verdict = run("file.copy", "ai-dev", destination="ai-dump", paths=["/tmp/x"])
    assert verdict.tiers["ai-dump"] == Tier.EXEC
    refusal(NotFoundError, "file.copy", "ai-dump", destination="ai-dev", paths=["/tmp/x"])


def test_copy_to_itself_is_invalid() -> None:
    refusal(InvalidInputError, "file.copy", "ai-dev", destination="ai-dev", paths=["/x"])


def test_device_attach_needs_full_on_both_ends() -> None:
    up = [
        qube("ai-build", "ai-managed", "ai-full", state="Running", netvm="ai-egress"),
        qube("ai-precious", "ai-managed", "ai-full", state="Running", netvm=""),
    ]
    assert run("device.attach", "ai-build", backend="ai-precious", device="sda", extra=up).consent
    refusal(InsufficientTierError, "device.attach", "ai-build", backend="ai-web", device="sda")


# --- promise 3: no self-escalation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "value", "why"),
    [
        ("netvm", "sys-firewall", "retarget to an out-of-scope netvm"),
        ("netvm", "ai-web", "retarget to an in-scope qube that is not the egress"),
        ("netvm", "ai-egress", "retarget from an out-of-scope netvm to the egress"),
    ],
)
def test_netvm_can_never_be_retargeted(prop: str, value: str, why: str) -> None:
    target = "ai-offnet" if "from an out-of-scope" in why else "ai-build"
    with pytest.raises((NotAllowedError, NotFoundError)):
        run("property.set", target, property=prop, value=value)


def test_netvm_can_be_disconnected_and_reconnected_to_the_egress() -> None:
    assert run("property.set", "ai-build", property="netvm", value=None).args["value"] is None
    run("property.set", "ai-precious", property="netvm", value="ai-egress")


def test_the_egress_qubes_netvm_is_operator_only() -> None:
    fleet_egress = qube(
        "ai-egress", "ai-managed", "ai-full", provides_network="True", netvm="sys-firewall"
    )
    with pytest.raises(NotAllowedError):
        run("property.set", "ai-egress", extra=[fleet_egress], property="netvm", value=None)


@pytest.mark.parametrize(
    ("feature", "allowed"),
    [
        ("service.cups", True),
        ("vm-config.x", True),
        ("internal", False),
        ("gui-allow-fullscreen", False),
        ("tag-created-vm-with", False),
        ("audiovm", False),
        ("qubes-mcp.tier", False),
        ("prohibit-start", False),
    ],
)
def test_features_are_an_allowlist(feature: str, allowed: bool) -> None:
    if allowed:
        run("feature.set", "ai-build", feature=feature, value="1")
    else:
        refusal(NotAllowedError, "feature.set", "ai-build", feature=feature, value="1")


@pytest.mark.parametrize(
    ("prop", "value", "exc"),
    [
        ("memory", "0", InvalidInputError),
        ("memory", "99999999", InvalidInputError),
        ("vcpus", "1e3", InvalidInputError),
        ("label", "chartreuse", InvalidInputError),
        ("autostart", "maybe", InvalidInputError),
        ("default_dispvm", "ai-build", NotAllowedError),
        ("template", "ai-build", NotAllowedError),
        ("template", None, InvalidInputError),
        ("netvm", "../etc", InvalidInputError),
    ],
)
def test_property_values_are_checked(prop: str, value: str | None, exc: type[GateError]) -> None:
    refusal(exc, "property.set", "ai-build", property=prop, value=value)


def test_property_values_are_normalised() -> None:
    assert (
        run("property.set", "ai-build", property="autostart", value="TRUE").args["value"] == "True"
    )
    assert run("property.set", "ai-build", property="default_dispvm", value="ai-dvm").args


# --- creation: tiers at birth, budgets, names ------------------------------------------------


def test_create_is_born_at_the_templates_tier_with_only_gate_tags() -> None:
    birth = run("qube.create", "ai-debian", name="ai-new").birth
    assert birth is not None
    assert birth.tier == Tier.EXEC
    assert birth.stamp == {"ai-managed", "ai-exec", "ai-owner-mcp-control"}
    assert birth.netvm == "ai-egress"
    assert run("qube.create", "ai-debian", name="ai-new", network="none").birth.netvm is None  # type: ignore[union-attr]


def test_birth_tier_is_clamped_by_the_ceiling() -> None:
    low = config(CONFIG_TEXT_LOW_CEILING)
    operation = OPERATIONS_BY_NAME["qube.create"]
    args = {f.name: f.default for f in operation.fields} | {"name": "ai-n"}
    verdict = decide(
        principal=low.principals["mcp-control"],
        op=operation,
        target="ai-fulltpl",
        args=args,
        facts=facts(["ai-fulltpl", "ai-n", "ai-egress"]),
        config=low,
    )
    assert verdict.birth is not None and verdict.birth.tier == Tier.EXEC
    assert "ai-full" not in verdict.birth.stamp


CONFIG_TEXT_LOW_CEILING = CONFIG_TEXT.replace('ceiling = "full"', 'ceiling = "exec"', 1)


@pytest.mark.parametrize(
    ("op", "target", "args", "exc"),
    [
        ("qube.create", "ai-dev", {"name": "ai-n"}, NotAllowedError),  # not a template
        ("qube.create", "ai-notes", {"name": "ai-n"}, InsufficientTierError),
        ("qube.create", "ai-debian", {"name": "ai-build"}, ConflictError),
        (
            "qube.create",
            "ai-debian",
            {"name": "ai-n", "private_size": 5 << 30},
            BudgetExceededError,
        ),
        ("qube.clone", "ai-fulltpl", {"name": "ai-n"}, NotAllowedError),  # template
        ("qube.clone", "ai-egress", {"name": "ai-n"}, InsufficientTierError),
        ("qube.clone", "ai-offnet", {"name": "ai-n"}, NotAllowedError),  # out-of-scope netvm
        ("disposable.create", "ai-dev", {}, NotAllowedError),  # not a dvm template
    ],
    ids=[
        "create-from-app-qube",
        "create-below-exec",
        "create-over-existing",
        "private-above-cap",
        "clone-template",
        "clone-egress-below-full",
        "clone-with-foreign-netvm",
        "disposable-from-app-qube",
    ],
)
def test_create_paths_refuse(
    op: str, target: str, args: dict[str, Any], exc: type[GateError]
) -> None:
    refusal(exc, op, target, **args)


@pytest.mark.parametrize("hidden", ["ai-secret", "ai-hybrid", "vault", "sys-firewall"])
@pytest.mark.parametrize(
    ("op", "target"),
    [("qube.create", "ai-debian"), ("qube.clone", "ai-dev"), ("qube.clone", "ai-build")],
)
def test_a_hidden_qubes_name_decides_as_a_free_name(op: str, target: str, hidden: str) -> None:
    """A create naming a qube the agent may not see is decided exactly as a free name: the
    same birth (but the name), and the same refusal when a budget refuses it. Only the act
    can fail on it (qubesd refuses the duplicate); refusing it here would be an oracle."""

    def outcome(name: str, **args: Any) -> object:
        try:
            verdict = run(op, target, name=name, **args)
        except GateError as exc:
            return (type(exc), exc.message)
        assert verdict.birth is not None
        return verdict.birth.__class__(**{**vars(verdict.birth), "name": "?"})

    assert outcome(hidden) == outcome("ai-free-name")
    if op == "qube.create":
        over = {"private_size": 5 << 30}
        assert outcome(hidden, **over) == outcome("ai-free-name", **over)
        assert outcome(hidden, **over)[0] is BudgetExceededError  # type: ignore[index]


def test_clone_of_a_network_provider_is_not_allowed() -> None:
    egress_full = qube(
        "ai-egress", "ai-managed", "ai-full", provides_network="True", netvm="sys-firewall"
    )
    refusal(NotAllowedError, "qube.clone", "ai-egress", extra=[egress_full], name="ai-n")


@pytest.mark.parametrize("op", ["disposable.create", "disposable.run"])
def test_a_disposable_of_a_network_provider_is_not_allowed(op: str) -> None:
    """R4.3 copies provides_network into the disposable: it would be born a provider."""
    args = {"command": ["true"]} if op == "disposable.run" else {}

    def dvm(**provides: str) -> Any:
        tags = ("ai-managed", "ai-exec")
        return qube("ai-dvm", *tags, template_for_dispvms="True", netvm="ai-egress", **provides)

    error = refusal(NotAllowedError, op, "ai-dvm", extra=[dvm(provides_network="True")], **args)
    assert "network-providing" in str(error)
    assert run(op, "ai-dvm", extra=[dvm(provides_network="False")], **args).birth is not None


def test_principal_that_may_not_create_is_refused() -> None:
    cfg = config(CONFIG_TEXT_LOW_CEILING.replace("may_create = true", "may_create = false", 1))
    operation = OPERATIONS_BY_NAME["disposable.create"]
    with pytest.raises(NotAllowedError):
        decide(
            principal=cfg.principals["mcp-control"],
            op=operation,
            target="ai-dvm",
            args={},
            facts=facts(["ai-dvm", "ai-egress"]),
            config=cfg,
        )


def test_pool_cap_counts_every_enrolled_qube() -> None:
    # 10 enrolled qubes x 2 GiB = 20 GiB; one more 2 GiB disposable fits 22 GiB but not 21
    for cap, fits in (("22GiB", True), ("21GiB", False)):
        cfg = config(CONFIG_TEXT.replace('pool_cap = "100GiB"', f'pool_cap = "{cap}"'))
        operation = OPERATIONS_BY_NAME["disposable.create"]
        names = ["ai-dvm", "ai-egress"]
        if fits:
            decide(
                principal=cfg.principals["mcp-control"],
                op=operation,
                target="ai-dvm",
                args={},
                facts=facts(names),
                config=cfg,
            )
        else:
            with pytest.raises(BudgetExceededError, match="pool budget"):
                decide(
                    principal=cfg.principals["mcp-control"],
                    op=operation,
                    target="ai-dvm",
                    args={},
                    facts=facts(names),
                    config=cfg,
                )


def test_max_qubes() -> None:
    cfg = config(CONFIG_TEXT.replace("max_qubes = 12", "max_qubes = 3"))
    operation = OPERATIONS_BY_NAME["disposable.create"]
    with pytest.raises(BudgetExceededError, match="maximum number"):
        decide(
            principal=cfg.principals["mcp-control"],
            op=operation,
            target="ai-dvm",
            args={},
            facts=facts(["ai-dvm", "ai-egress"]),
            config=cfg,
        )


# --- consent ----------------------------------------------------------------------------------


def test_consent_defaults_follow_the_table() -> None:
    assert run("qube.remove", "ai-build").consent
    assert not run("qube.start", "ai-build").consent
    assert run("firewall.set", "ai-web", rules=[]).consent


def test_guarded_qubes_need_consent_for_every_change_but_not_reads() -> None:
    verdict = run("qube.start", "ai-precious")
    assert verdict.consent and "ai-precious is guarded" in verdict.consent_reasons
    assert not run("qube.info", "ai-precious").consent


def test_guarded_tag_works_like_the_config_list() -> None:
    tagged = qube("ai-build", "ai-managed", "ai-full", "ai-guarded")
    assert run("qube.start", "ai-build", extra=[tagged]).consent


@pytest.mark.parametrize(
    ("source", "extra"),
    [
        ("ai-precious", []),  # guarded by the config list
        ("ai-build", [qube("ai-build", "ai-managed", "ai-full", "ai-guarded")]),
    ],
    ids=["config-guarded", "tag-guarded"],
)
def test_what_is_born_of_a_guarded_qube_is_guarded(source: str, extra: Any) -> None:
    verdict = run("qube.clone", source, extra=extra, name="ai-copy")
    assert verdict.consent  # cloning a guarded qube waits for the operator
    assert verdict.birth is not None and "ai-guarded" in verdict.birth.stamp


def test_an_unguarded_source_gives_an_unguarded_birth() -> None:
    birth = run("qube.clone", "ai-build", name="ai-copy").birth
    assert birth is not None and "ai-guarded" not in birth.stamp
