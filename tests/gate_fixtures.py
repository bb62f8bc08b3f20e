"""Data builders for gate tests: a small fleet of facts and a configuration, as plain values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qubes_mcp.dom0.config import GateConfig, Principal, parse_config
from qubes_mcp.dom0.decide import Verdict, decide, names_to_read
from qubes_mcp.dom0.facts import Facts, Prop, QubeFacts
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME

CONFIG_TEXT = """
default_tier = "read"
egress_qube = "ai-egress"

[[principal]]
qube = "mcp-control"
scope = "ai"
ceiling = "full"
name_prefix = "ai-"
may_create = true

[[principal]]
qube = "auditor"
scope = "ai"
ceiling = "read"
name_prefix = "aud-"
may_create = false

[budget]
pool_cap = "100GiB"
private_cap = "4GiB"
default_private = "2GiB"
max_qubes = 12

[consent]
timeout = 30
guarded = ["ai-precious"]
"""


def config(text: str = CONFIG_TEXT) -> GateConfig:
    return parse_config(text)


_AS_TAGGED = "as-tagged"


def _registration(tags: Iterable[str], registered: str | None) -> str | None:
    """The registry's answer the reader would give: by default, the operator enrolled exactly
    the qubes that carry an ``ai`` scope tag (the facts a migrated fleet has)."""
    if registered != _AS_TAGGED:
        return registered
    tagset = set(tags)
    if "ai-managed" in tagset:
        return "member"
    return "dump" if "ai-dump" in tagset else None


def qube(
    name: str,
    *tags: str,
    klass: str = "AppVM",
    state: str = "Halted",
    footprint: int = 2 << 30,
    registered: str | None = _AS_TAGGED,
    **props: str,
) -> QubeFacts:
    """Facts for one qube; ``registered=None`` is a qube whose tags are not backed by a
    registration (an operator's disposable or clone that inherited them)."""
    return QubeFacts(
        registered=_registration(tags, registered),
        name=name,
        klass=klass,
        state=state,
        tags=frozenset(tags),
        props={k: Prop(False, "str", v) for k, v in props.items()},
        footprint=footprint,
        private_size=footprint,
    )


def demo_qubes() -> list[QubeFacts]:
    """Names mirror the emulator's demo fleet."""
    return [
        qube("dom0", klass="AdminVM", state="Running"),
        qube("vault", netvm=""),
        qube("work", netvm="sys-firewall"),
        qube("sys-firewall", provides_network="True", netvm="sys-net"),
        qube("ai-egress", "ai-managed", provides_network="True", netvm="sys-firewall"),
        qube("ai-notes", "ai-managed", netvm="ai-egress"),
        qube("ai-dev", "ai-managed", "ai-exec", netvm="ai-egress"),
        qube("ai-web", "ai-managed", "ai-net", netvm="ai-egress"),
        qube("ai-build", "ai-managed", "ai-full", netvm="ai-egress"),
        qube("ai-precious", "ai-managed", "ai-full", netvm=""),
        qube("ai-offnet", "ai-managed", "ai-full", netvm="sys-firewall"),
        qube("ai-dvm", "ai-managed", "ai-exec", template_for_dispvms="True", netvm="ai-egress"),
        qube("ai-debian", "ai-managed", "ai-exec", klass="TemplateVM", netvm=""),
        qube("ai-fulltpl", "ai-managed", "ai-full", klass="TemplateVM", netvm=""),
        qube("debian-13-xfce", klass="TemplateVM"),
        qube("ai-dump", "ai-dump"),
        qube("ai-hybrid", "ai-managed", "ai-dump", "ai-full"),
        qube("ai-secret"),  # inside the prefix, but the operator never enrolled it
    ]


def facts(names: Iterable[str], extra: Iterable[QubeFacts] = ()) -> Facts:
    """Facts for the given names from the demo fleet (missing names map to None)."""
    fleet = {q.name: q for q in [*demo_qubes(), *extra]}
    scope = tuple(
        q
        for q in fleet.values()
        if q.registered == "member" and "ai-managed" in q.tags and "ai-dump" not in q.tags
    )
    return Facts(qubes={n: fleet.get(n) for n in names}, scope_qubes=scope)


def decide_request(
    cfg: GateConfig,
    op: str,
    target: str | None,
    *,
    principal: Principal | None,
    extra: Iterable[QubeFacts] = (),
    now: bool = True,
    **args: Any,
) -> Verdict:
    """``decide`` for one request as the gate calls it: the operation's defaults filled in,
    and the facts of every name the decision reads (and the egress qube)."""
    operation = OPERATIONS_BY_NAME[op]
    full_args = {f.name: f.default for f in operation.fields} | args
    names = [*names_to_read(operation, target, full_args), "ai-egress"]
    return decide(
        principal=principal,
        op=operation,
        target=target,
        args=full_args,
        facts=facts(names, extra),
        config=cfg,
        now=now,
    )
