"""Egress per principal (issue 10 §4): each ``[[principal]]`` may name its own
``egress_qube``; the top-level one is the default for those that name none."""

from __future__ import annotations

import pytest

from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.decide import decide, names_to_read
from qubes_mcp.dom0.errors import ConfigError, NotAllowedError, NotFoundError
from qubes_mcp.dom0.facts import Facts
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME
from tests.gate_fixtures import qube

TWO = """
egress_qube = "ai-egress"

[[principal]]
qube = "mcp-control"
scope = "ai"
may_create = true

[[principal]]
qube = "tor-control"
scope = "tor"
may_create = true
egress_qube = "sys-whonix"
"""


def test_a_principal_without_its_own_egress_takes_the_default() -> None:
    cfg = parse_config(TWO)
    assert cfg.principals["mcp-control"].egress_qube == "ai-egress"
    assert cfg.principals["tor-control"].egress_qube == "sys-whonix"
    assert cfg.egress_qubes == {"ai-egress", "sys-whonix"}
    assert (cfg.scope_egress("ai"), cfg.scope_egress("tor")) == ("ai-egress", "sys-whonix")


def test_no_egress_anywhere_means_offline_births() -> None:
    cfg = parse_config('[[principal]]\nqube = "a"\n')
    assert cfg.principals["a"].egress_qube is None and cfg.egress_qubes == frozenset()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            TWO + '[[principal]]\nqube = "aud"\nscope = "tor"\negress_qube = "ai-egress"\n',
            "principals of scope 'tor' name different egress qubes",
        ),
        (
            # inherits ai-egress while its scope-mate names another
            TWO + '[[principal]]\nqube = "aud"\nscope = "tor"\n',
            "principals of scope 'tor' name different egress qubes",
        ),
        (TWO.replace('"sys-whonix"', '"mcp-control"'), "egress_qube cannot be"),
        (TWO.replace('"sys-whonix"', '"dom0"'), "not dom0"),
        (TWO.replace('"sys-whonix"', "3"), "egress_qube must be a qube name"),
        (TWO.replace('"sys-whonix"', '"bad name"'), "egress_qube must be a qube name"),
    ],
    ids=[
        "scope-mates-disagree",
        "scope-mate-inherits-another",
        "control-qube",
        "dom0",
        "not-a-string",
        "not-a-name",
    ],
)
def test_egress_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert problem in str(info.value)


# --- the decision: births and netvm writes use the caller's egress, never another's ----------

TOR_FLEET = [
    qube(n, *tags, registered="member", **props)  # type: ignore[arg-type]
    for n, tags, props in [
        (
            "ai-egress",
            ("ai-managed", "ai-full", "tor-managed", "tor-full"),
            {"provides_network": "True"},
        ),
        (
            "sys-whonix",
            ("ai-managed", "ai-full", "tor-managed", "tor-full"),
            {"provides_network": "True"},
        ),
        ("tor-debian", ("tor-managed", "tor-exec"), {"klass": "TemplateVM"}),
        ("tor-dev", ("tor-managed", "tor-full"), {"netvm": ""}),
        ("ai-debian", ("ai-managed", "ai-exec"), {"klass": "TemplateVM"}),
        ("ai-dev", ("ai-managed", "ai-full"), {"netvm": ""}),
    ]
]


def _decide(principal: str, op: str, target: str, **args: object) -> object:
    """Decide with a fleet where the operator enrolled *both* egress qubes in *both* scopes:
    even then a principal's qubes reach the network only through its own egress."""
    cfg = parse_config(TWO)
    operation = OPERATIONS_BY_NAME[op]
    full = {f.name: f.default for f in operation.fields} | args
    fleet = {q.name: q for q in TOR_FLEET}
    names = [*names_to_read(operation, target, full), "ai-egress", "sys-whonix"]
    p = cfg.principals[principal]
    scope = tuple(q for q in fleet.values() if p.scope.managed in q.tags)
    return decide(
        principal=p,
        op=operation,
        target=target,
        args=full,
        facts=Facts(qubes={n: fleet.get(n) for n in names}, scope_qubes=scope),
        config=cfg,
    )


@pytest.mark.parametrize(
    ("principal", "template", "name", "egress"),
    [
        ("mcp-control", "ai-debian", "ai-new", "ai-egress"),
        ("tor-control", "tor-debian", "tor-new", "sys-whonix"),
    ],
)
def test_a_birth_takes_its_principals_egress(
    principal: str, template: str, name: str, egress: str
) -> None:
    verdict = _decide(principal, "qube.create", template, name=name)
    assert verdict.birth is not None and verdict.birth.netvm == egress  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("principal", "qube_name", "foreign"),
    [("mcp-control", "ai-dev", "sys-whonix"), ("tor-control", "tor-dev", "ai-egress")],
)
def test_a_qube_cannot_be_connected_to_another_principals_egress(
    principal: str, qube_name: str, foreign: str
) -> None:
    with pytest.raises(NotAllowedError):
        _decide(principal, "property.set", qube_name, property="netvm", value=foreign)


@pytest.mark.parametrize("egress", ["ai-egress", "sys-whonix"])
def test_every_principals_egress_has_an_operator_only_netvm(egress: str) -> None:
    with pytest.raises((NotAllowedError, NotFoundError)):
        _decide("tor-control", "property.set", egress, property="netvm", value=None)
