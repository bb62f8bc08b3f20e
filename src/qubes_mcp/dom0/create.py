"""Creating qubes: create from a template, disposables, clones — born at a decided tier.

Every path ends in the same birth: strip every tag of every configured scope (whatever the
platform propagated: a disposable inherits all of its template's tags, qubesd adds
``created-by-*``), stamp only the decided tags, set the netvm explicitly, then read tags and
netvm back. Any failure after the qube exists removes it again; a removal that fails is
reported as ``failed`` with ``rolled_back: false`` in the audit log and the dom0 journal, never
hidden. Clones are composed here (there is no server-side clone): only allowlisted properties,
writable features, the firewall and the private volume are copied — never tags, never
``provides_network``.
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


def _controlled(ctx: Context, tag: str) -> bool:
    return any(p.scope.is_controlled(tag) for p in ctx.config.principals.values())


async def _birth(ctx: Context, birth: Birth, name: str) -> None:
    tags = set(await ctx.admin.lines(name, "admin.vm.tag.List"))
    for tag in sorted(t for t in tags if _controlled(ctx, t) and t not in birth.stamp):
        await ctx.qubesd(name, "admin.vm.tag.Remove", tag)
    for tag in sorted(birth.stamp - tags):
        await ctx.qubesd(name, "admin.vm.tag.Set", tag)
    if birth.template_for_dispvms:
        await ctx.qubesd(name, "admin.vm.property.Set", "template_for_dispvms", b"True")
    await ctx.qubesd(name, "admin.vm.property.Set", "netvm", (birth.netvm or "").encode("ascii"))
    if birth.private_size is not None:
        await ctx.qubesd(
            name, "admin.vm.volume.Resize", "private", str(birth.private_size).encode("ascii")
        )
    # read back: the qube is never reported (or started) before its tags and network are right
    got = {t for t in await ctx.admin.lines(name, "admin.vm.tag.List") if _controlled(ctx, t)}
    netvm = property_value(await ctx.qubesd(name, "admin.vm.property.Get", "netvm"))
    if got != birth.stamp or netvm != (birth.netvm or ""):
        raise FailedError(reason="birth read-back differs")
    await ctx.enter_scope(name)  # last: registered by name only once everything else is right


async def _rollback(ctx: Context, name: str, cause: BaseException) -> None:
    try:
        await ctx.admin.call(name, "admin.vm.Remove")
    except (QubesdError, GateError) as exc:
        ctx.detail["rolled_back"] = False
        log.error(
            "qubes-mcp: could not roll back %s after %s: %s (remove it by hand)",
            name,
            type(cause).__name__,
            type(exc).__name__,
        )
        raise FailedError(reason=f"rollback of {name} failed") from None
    ctx.detail["rolled_back"] = True


async def _finish(
    ctx: Context, birth: Birth, name: str, prepare: Callable[[], Awaitable[None]] | None = None
) -> None:
    """The qube exists: ``prepare`` it (a clone's copies), give it its birth, or remove it."""
    try:
        if prepare is not None:
            await prepare()
        await _birth(ctx, birth, name)
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
    name = (await ctx.qubesd(birth.source, "admin.vm.CreateDisposable")).strip()
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
