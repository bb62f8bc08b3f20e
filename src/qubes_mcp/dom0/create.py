"""Creating qubes: create from a template, disposables, clones — born at a decided tier.

Every path ends in the same birth, in an order that leaves no moment in which the qube is in
a scope with anything undecided (issue 11 §1):

1. create it (a disposable under a gate-chosen name, ``disp-mcp-<request id>``);
2. mark it with the birth marker ``qubes-mcp-birth-<request id>``, a tag in a namespace only
   the gate writes (agents cannot write tags at all), so start-up recovery can tell a qube
   this request created from anything else (dom0/recovery.py);
3. a clone's copies; then strip whatever it inherited that the gate did not decide: every tag
   of every configured scope and every other birth marker (a disposable inherits all of its
   template's tags, qubesd adds ``created-by-*``), and on a disposable every feature an agent
   could not have set (R4.3 copies the template's features; docs/decisions/0008);
4. set every decided property (netvm, ``template_for_dispvms``, a disposable's
   ``auto_cleanup``), resize, and read it all back — tags, netvm, ``provides_network``,
   features;
5. :func:`_enter_scope`, last: the scope's tags, then the registration by name that makes the
   qube visible to an agent (decision record 0010); read the scope tags back; remove the
   birth marker.

Any failure after the qube exists removes it again; a removal that fails is reported as
``failed`` with ``rolled_back: false`` in the audit log and the dom0 journal, never hidden,
and the marker lets recovery and ``doctor`` find it. Clones are composed here (there is no
server-side clone): only allowlisted properties, writable features, the firewall and the
private volume are copied — never tags, never ``provides_network``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from qubes_mcp.dom0.admin import QubesdError
from qubes_mcp.dom0.context import Context, map_qubesd_error
from qubes_mcp.dom0.decide import WRITABLE_FEATURE_PREFIXES, Birth
from qubes_mcp.dom0.errors import FailedError, GateError
from qubes_mcp.dom0.handlers_write import run_request
from qubes_mcp.dom0.reader import property_value

log = logging.getLogger("qubes_mcp.gate")

#: properties a clone takes from its source when they are not at their default
CLONE_PROPERTIES = (
    "memory",
    "maxmem",
    "vcpus",
    "virt_mode",
    "kernelopts",
    "include_in_backups",
    "template_for_dispvms",
)
#: the birth marker's namespace: written by the gate only, present only while a birth runs
BIRTH_TAG_PREFIX = "qubes-mcp-birth-"
#: a disposable the gate creates is named for its request (qubesd's own are ``disp<N>``)
DISPOSABLE_PREFIX = "disp-mcp-"


def birth_tag(request_id: str) -> str:
    """The birth marker of the qube that request ``request_id`` creates."""
    if not request_id.isalnum():  # the gate's ids are hex; anything else is a wiring bug
        raise ValueError("a birth needs the gate's request id")
    return BIRTH_TAG_PREFIX + request_id


def disposable_name(request_id: str) -> str:
    """The name of the disposable request ``request_id`` creates (known before it exists)."""
    birth_tag(request_id)
    return DISPOSABLE_PREFIX + request_id


def _controlled(ctx: Context, tag: str) -> bool:
    return tag.startswith(BIRTH_TAG_PREFIX) or any(
        p.scope.is_controlled(tag) for p in ctx.config.principals.values()
    )


async def _controlled_tags(ctx: Context, name: str) -> set[str]:
    return {t for t in await ctx.admin.lines(name, "admin.vm.tag.List") if _controlled(ctx, t)}


async def _prop(ctx: Context, name: str, prop: str) -> str:
    return property_value(await ctx.qubesd(name, "admin.vm.property.Get", prop))


async def _strip(ctx: Context, birth: Birth, name: str, marker: str) -> None:
    """Remove what the qube inherited and the gate did not decide (tags; a disposable's
    features)."""
    for tag in sorted(await _controlled_tags(ctx, name) - {marker}):
        await ctx.qubesd(name, "admin.vm.tag.Remove", tag)
    if birth.klass == "DispVM":
        for feature in await ctx.admin.lines(name, "admin.vm.feature.List"):
            if not feature.startswith(WRITABLE_FEATURE_PREFIXES):
                await ctx.qubesd(name, "admin.vm.feature.Remove", feature)


async def _decide_properties(ctx: Context, birth: Birth, name: str) -> None:
    if birth.klass == "DispVM":  # as admin.vm.CreateDisposable would: removed when halted
        await ctx.qubesd(name, "admin.vm.property.Set", "auto_cleanup", b"True")
    if birth.template_for_dispvms:
        await ctx.qubesd(name, "admin.vm.property.Set", "template_for_dispvms", b"True")
    await ctx.qubesd(name, "admin.vm.property.Set", "netvm", (birth.netvm or "").encode("ascii"))
    if birth.private_size is not None:
        await ctx.qubesd(
            name, "admin.vm.volume.Resize", "private", str(birth.private_size).encode("ascii")
        )


async def _read_back(ctx: Context, birth: Birth, name: str, marker: str) -> None:
    """Everything decided is what qubesd now holds, before the qube enters any scope."""
    differs = []
    if await _controlled_tags(ctx, name) != {marker}:
        differs.append("tags")
    if await _prop(ctx, name, "netvm") != (birth.netvm or ""):
        differs.append("netvm")
    if await _prop(ctx, name, "provides_network") != "False":
        differs.append("provides_network")
    if birth.template_for_dispvms and await _prop(ctx, name, "template_for_dispvms") != "True":
        differs.append("template_for_dispvms")
    if birth.klass == "DispVM":
        if await _prop(ctx, name, "auto_cleanup") != "True":
            differs.append("auto_cleanup")
        features = await ctx.admin.lines(name, "admin.vm.feature.List")
        if any(not f.startswith(WRITABLE_FEATURE_PREFIXES) for f in features):
            differs.append("features")
    if differs:
        raise FailedError(reason=f"birth read-back differs: {' '.join(differs)}")


async def _enter_scope(ctx: Context, birth: Birth, name: str) -> None:
    """The qube enters the principal's scope: the one step that makes it visible to an agent.

    Called last, once everything else is decided, set and read back. The tier, owner and
    guarded tags go on first and ``<scope>-managed`` last; then the name is registered in dom0
    (decision record 0010), which is what makes it visible to an agent. The birth marker is
    still on it: an interruption anywhere here leaves a marked qube, which recovery removes
    (and the registry's reconcile forgets).
    """
    managed = ctx.principal.scope.managed
    for tag in sorted(birth.stamp - {managed}):
        await ctx.qubesd(name, "admin.vm.tag.Set", tag)
    await ctx.qubesd(name, "admin.vm.tag.Set", managed)
    await ctx.enter_scope(name)


async def _birth(
    ctx: Context, birth: Birth, name: str, prepare: Callable[[], Awaitable[None]] | None
) -> None:
    marker = birth_tag(ctx.request_id)
    await ctx.qubesd(name, "admin.vm.tag.Set", marker)
    if prepare is not None:
        await prepare()
    await _strip(ctx, birth, name, marker)
    await _decide_properties(ctx, birth, name)
    await _read_back(ctx, birth, name, marker)
    await _enter_scope(ctx, birth, name)
    if await _controlled_tags(ctx, name) != birth.stamp | {marker}:
        raise FailedError(reason="birth read-back differs: scope tags")
    await ctx.qubesd(name, "admin.vm.tag.Remove", marker)


async def _rollback(ctx: Context, name: str, cause: BaseException) -> None:
    try:
        await ctx.admin.call(name, "admin.vm.Remove")
    except (QubesdError, GateError) as exc:
        ctx.detail["rolled_back"] = False
        log.error(
            "qubes-mcp: could not roll back %s after %s: %s (recovery at the next start, or "
            "`qubes-mcp-admin doctor`, finds it by its birth marker)",
            name,
            type(cause).__name__,
            type(exc).__name__,
        )
        raise FailedError(reason=f"rollback of {name} failed") from None
    ctx.detail["rolled_back"] = True
    # forget a registration the birth may have reached (a no-op otherwise); if this fails, the
    # registry's reconcile forgets the removed name on qubesd's domain-delete
    with contextlib.suppress(GateError):
        await ctx.leave_scope(name)


async def _finish(
    ctx: Context, birth: Birth, name: str, prepare: Callable[[], Awaitable[None]] | None = None
) -> None:
    """The qube exists: mark it, ``prepare`` it (a clone's copies), give it its birth — or
    remove it."""
    try:
        await _birth(ctx, birth, name, prepare)
    except Exception as exc:  # any failure after the qube exists: take it back out
        await _rollback(ctx, name, exc)
        if isinstance(exc, QubesdError):
            raise map_qubesd_error(exc) from None
        if isinstance(exc, GateError):
            raise
        raise FailedError(reason=f"birth failed: {type(exc).__name__}") from None


def _describe(birth: Birth, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "class": birth.klass,
        "tier": birth.tier.word,
        "netvm": birth.netvm,
        "source": birth.source,
        "label": birth.label,
    }


async def qube_create(ctx: Context) -> dict[str, Any]:
    birth = ctx.verdict.birth
    assert birth is not None
    ctx.detail.update(template=birth.source, klass=birth.klass, label=birth.label)
    await ctx.qubesd(
        "dom0",
        "admin.vm.Create.AppVM",
        birth.source,
        f"name={birth.name} label={birth.label}".encode("ascii"),
    )
    await _finish(ctx, birth, birth.name)
    return _describe(birth, birth.name)


async def _new_disposable(ctx: Context, birth: Birth) -> str:
    """A named DispVM (``admin.vm.Create.DispVM``), not ``admin.vm.CreateDisposable``: its
    name is known from the request id before it exists, and qubesd never hands out a
    preloaded, already running disposable that the birth has not yet made safe."""
    name = disposable_name(ctx.request_id)
    await ctx.qubesd(
        "dom0",
        "admin.vm.Create.DispVM",
        birth.source,
        f"name={name} label={birth.label}".encode("ascii"),
    )
    await _finish(ctx, birth, name)
    return name


async def disposable_create(ctx: Context) -> dict[str, Any]:
    birth = ctx.verdict.birth
    assert birth is not None
    ctx.detail.update(template=birth.source, klass="DispVM")
    return _describe(birth, await _new_disposable(ctx, birth))


async def disposable_run(ctx: Context) -> dict[str, Any]:
    """Create, start, run once, then kill (auto_cleanup removes it) — whatever happens."""
    birth = ctx.verdict.birth
    assert birth is not None
    ctx.detail.update(template=birth.source, klass="DispVM")
    name = await _new_disposable(ctx, birth)
    try:
        await ctx.qubesd(name, "admin.vm.Start")
        result = await run_request(ctx, name)
    finally:
        # out of the scope first (its policy lines go), then gone; a registration left behind
        # if this fails is forgotten by the registry's reconcile on qubesd's domain-delete
        with contextlib.suppress(GateError):
            await ctx.leave_scope(name)
        with contextlib.suppress(QubesdError):  # already halted
            await ctx.admin.call(name, "admin.vm.Kill")
        with contextlib.suppress(QubesdError):  # auto_cleanup got there first
            await ctx.admin.call(name, "admin.vm.Remove")
    return {**result, "disposable": name}


async def qube_clone(ctx: Context) -> dict[str, Any]:
    birth = ctx.verdict.birth
    source = ctx.facts.get(birth.source if birth else None)
    assert birth is not None and source is not None
    ctx.detail.update(source=source.name, klass="AppVM")
    await ctx.qubesd(
        "dom0",
        "admin.vm.Create.AppVM",
        source.prop("template"),
        f"name={birth.name} label={birth.label}".encode("ascii"),
    )

    async def copy_from_source() -> None:
        for prop in CLONE_PROPERTIES:
            p = source.props.get(prop)
            if p is not None and not p.is_default:
                await ctx.qubesd(birth.name, "admin.vm.property.Set", prop, p.value.encode())
        for feature in await ctx.admin.lines(source.name, "admin.vm.feature.List"):
            if feature.startswith(WRITABLE_FEATURE_PREFIXES):
                value = await ctx.qubesd(source.name, "admin.vm.feature.Get", feature)
                await ctx.qubesd(birth.name, "admin.vm.feature.Set", feature, value.encode())
        rules = await ctx.qubesd(source.name, "admin.vm.firewall.Get")
        await ctx.qubesd(birth.name, "admin.vm.firewall.Set", payload=rules.encode())
        token = await ctx.qubesd(source.name, "admin.vm.volume.CloneFrom", "private")
        await ctx.qubesd(birth.name, "admin.vm.volume.CloneTo", "private", token.encode())

    await _finish(ctx, birth, birth.name, copy_from_source)
    return _describe(birth, birth.name)
