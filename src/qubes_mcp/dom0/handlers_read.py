"""Read operations: list, info, firewall, devices, events, budget, console log. Everything
passes redact (the console log is escaped byte by byte)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from qubes_mcp.dom0 import redact
from qubes_mcp.dom0.admin import QubesdError
from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.errors import FailedError
from qubes_mcp.dom0.facts import Prop, QubeFacts
from qubes_mcp.dom0.firewall import parse_rule_line
from qubes_mcp.dom0.operations import DEVICE_CLASSES, REVISION_PATTERN
from qubes_mcp.dom0.reader import property_value
from qubes_mcp.dom0.tiers import effective_tier

_KV_RE = re.compile(r"([A-Za-z0-9_-]+)='((?:[^'\\]|\\.)*)'")
_DEVICE_KEYS = ("port_id", "product", "vendor", "name", "serial", "interfaces")
MAX_EVENTS = 1000


async def qube_list(ctx: Context) -> dict[str, Any]:
    """The registered qubes of the scope that are in it now (never a walk of the host)."""
    qubes = []
    sinks = []
    p = ctx.principal
    for q in sorted(await ctx.reader.registered(), key=lambda q: q.name):
        if p.scope.is_dump_sink(q.tags, q.registered):
            sinks.append(q.name)  # the operator made it a copy target for this scope
        tier = effective_tier(p.scope, q.tags, q.registered, ctx.config.default_tier, p.ceiling)
        if tier is not None:
            qubes.append(redact.summary(await _with_dispvm_flag(ctx, q), tier))
    return {
        "principal": p.qube,
        "ceiling": p.ceiling.word,
        "name_prefix": p.name_prefix,
        "may_create": p.may_create,
        # so the MCP side can order its timeouts after dom0's (consent answered or refused)
        "consent_timeout": ctx.config.consent.timeout,
        "qubes": qubes,
        "dump_sinks": sinks,
    }


async def _with_dispvm_flag(ctx: Context, q: QubeFacts) -> QubeFacts:
    """``q`` with ``template_for_dispvms`` read, so ``redact.summary`` shows the class as
    ``qube_info`` does (only an app qube can be a disposable template: one read each)."""
    if q.klass != "AppVM":
        return q
    try:
        got = await ctx.admin.call(q.name, "admin.vm.property.Get", "template_for_dispvms")
    except QubesdError:
        return q  # removed meanwhile: shown as qubesd listed it
    return replace(q, props={"template_for_dispvms": Prop(False, "bool", property_value(got))})


async def qube_info(ctx: Context) -> dict[str, Any]:
    q = ctx.facts.get(ctx.target)
    assert q is not None
    features: dict[str, str] = {}
    for name in await ctx.admin.lines(q.name, "admin.vm.feature.List"):
        if redact.readable_feature(name):
            with contextlib.suppress(QubesdError):
                features[name] = await ctx.admin.call(q.name, "admin.vm.feature.Get", name)
    visible: dict[str, bool] = {}
    for prop in redact.VM_VALUED:
        ref = q.prop(prop)
        if ref and ref not in visible:
            visible[ref] = await ctx.in_scope(ref)
    revisions: list[str] | None = None
    with contextlib.suppress(QubesdError):
        # the revisions qube.revert can put back, oldest first (admin.vm.volume.ListSnapshots)
        listed = await ctx.admin.lines(q.name, "admin.vm.volume.ListSnapshots", "private")
        revisions = [r for r in listed if _REVISION.match(r)][-MAX_REVISIONS:]
    return redact.info(
        q,
        ctx.verdict.tiers[q.name],
        ctx.principal.scope,
        features,
        lambda name: visible.get(name, False),
        revisions=revisions,
        resources=await _resources(ctx, q.name) if q.running else None,
    )


#: more revisions than anyone keeps: a bound on what one info reply carries
MAX_REVISIONS = 64
#: a revision id qube.revert accepts (its field's pattern and length): only those are shown
_REVISION = re.compile(REVISION_PATTERN)
_STATE_KEYS = {"mem": "memory_kib", "mem_static_max": "memory_max_kib", "cputime": "cpu_time_ns"}


async def _resources(ctx: Context, name: str) -> dict[str, int] | None:
    """A running qube's memory and its maximum (KiB, libvirt's figures) and its CPU time so
    far (ns), from one ``admin.vm.CurrentState`` call
    (``mem=… mem_static_max=… cputime=… power_state=…``): a bounded read, no stream."""
    try:
        line = await ctx.admin.call(name, "admin.vm.CurrentState")
    except QubesdError:
        return None  # halted or gone meanwhile: no figures rather than a failed info
    figures: dict[str, int] = {}
    for word in line.split():
        key, _, value = word.partition("=")
        if key in _STATE_KEYS and value.isdigit() and len(value) <= 20:
            figures[_STATE_KEYS[key]] = int(value)
    return figures or None


async def qube_log(ctx: Context) -> dict[str, Any]:
    """The last lines of the qube's console log, read by dom0 from its own copy
    (``[paths] console_logs``/guest-NAME.log), so a qube that crashed can still be read.

    Only the last ``[limits] log_bytes`` bytes are read; a line cut by that start is
    dropped. Everything but printable ASCII is escaped (``\\xNN``), so nothing the qube
    wrote reaches the agent as a control sequence."""
    cap = ctx.config.limits.log_bytes
    want = ctx.args["lines"]
    path = ctx.config.paths.console_logs / f"guest-{ctx.target}.log"
    try:
        data, size = await asyncio.to_thread(_tail, path, cap)
    except FileNotFoundError:
        return {"qube": ctx.target, "lines": [], "truncated": False}
    except OSError as exc:
        raise FailedError(reason=f"console log unreadable: {type(exc).__name__}") from None
    cut = size > len(data)
    if cut:
        data = data.partition(b"\n")[2]  # the first line began before what was read
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    shown = lines[-want:]
    ctx.detail["bytes"] = len(data)
    return {
        "qube": ctx.target,
        "lines": [escape_log_line(line) for line in shown],
        "truncated": cut or len(lines) > len(shown),
    }


def _tail(path: Path, cap: int) -> tuple[bytes, int]:
    """The last ``cap`` bytes of ``path`` and its size, never reading more."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(path)
        start = max(0, st.st_size - cap)
        chunks: list[bytes] = []
        got = 0
        while got < cap:
            chunk = os.pread(fd, cap - got, start + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks), max(st.st_size, start + got)
    finally:
        os.close(fd)


_LOG_UNSAFE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")


def escape_log_line(raw: bytes) -> str:
    """Printable ASCII kept, a backslash doubled, every other byte ``\\xNN``."""
    return _LOG_UNSAFE.sub(
        lambda m: b"\\\\" if m.group() == b"\\" else b"\\x%02x" % m.group()[0], raw
    ).decode("ascii")


async def firewall_get(ctx: Context) -> dict[str, Any]:
    lines = (await ctx.qubesd(ctx.target, "admin.vm.firewall.Get")).split("\n")
    return {"qube": ctx.target, "rules": [parse_rule_line(line) for line in lines if line]}


def _parse_device_line(line: str) -> tuple[str, dict[str, str]]:
    head, _, rest = line.partition(" ")
    return head, {k: v.replace("\\'", "'") for k, v in _KV_RE.findall(rest)}


async def devices_list(ctx: Context) -> dict[str, Any]:
    """The block and USB devices a qube exposes and those attached to it, each with its
    ``devclass``. A dom0 without the USB proxy has no ``usb`` methods: no USB devices."""
    visible: dict[str, bool] = {}

    async def show(name: str) -> str:
        if name not in visible:
            visible[name] = await ctx.in_scope(name)
        return name if visible[name] else redact.OUT_OF_SCOPE

    async def lines(devclass: str, endpoint: str) -> list[str]:
        method = f"admin.vm.device.{devclass}.{endpoint}"
        if devclass == "block":
            return await ctx.admin.lines(ctx.target, method)
        try:
            return await ctx.admin.lines(ctx.target, method)
        except QubesdError:
            return []

    exposed = []
    attached = []
    for devclass in DEVICE_CLASSES:
        for line in await lines(devclass, "Available"):
            _, info = _parse_device_line(line)
            entry: dict[str, Any] = {"devclass": devclass}
            entry.update({k: info[k] for k in _DEVICE_KEYS if k in info})
            if info.get("attachment"):
                entry["attached_to"] = await show(info["attachment"])
            exposed.append(entry)
        for line in await lines(devclass, "Attached"):
            head, info = _parse_device_line(line)
            backend = info.get("backend_domain") or head.partition("+")[0]
            attached.append(
                {
                    "devclass": devclass,
                    "backend": await show(backend),
                    "port_id": info.get("port_id", ""),
                    "mode": info.get("mode", ""),
                }
            )
    return {"qube": ctx.target, "exposed": exposed, "attached": attached}


async def budget_get(ctx: Context) -> dict[str, Any]:
    qubes = await ctx.reader.scope_qubes()
    used = sum(q.footprint for q in qubes)
    b = ctx.config.budget
    return {
        "pool_used": used,
        "pool_cap": b.pool_cap,
        "pool_free": max(0, b.pool_cap - used),
        "private_cap": b.private_cap,
        "qubes": len(qubes),
        "max_qubes": b.max_qubes,
    }


async def events_watch(ctx: Context) -> dict[str, Any]:
    """Collect visible events for a bounded window; scope is tracked as tags change.

    The window is fixed and the event cap counts visible events only, so neither the reply
    nor its time depends on how many events hidden qubes produce."""
    args = ctx.args
    seconds = min(args["seconds"], ctx.config.limits.event_window)
    only = args.get("qube")
    scope = ctx.principal.scope
    enrolled = {q["name"] for q in (await qube_list(ctx))["qubes"]}
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    stream = ctx.admin.events("dom0")

    async def collect() -> None:
        async for ev in stream:
            about = ev.subject or ev.kwargs.get("vm", "")
            if about not in enrolled and ctx.reader.refresh().entry(scope.prefix, about):
                # only a registered name can be in scope (a tag alone enrols nobody: it may be
                # inherited), so an event about any other qube costs a dict lookup and no
                # qubesd read: the stream of hidden qubes' events is not work done for them
                if await ctx.reader.in_scope(about):
                    enrolled.add(about)
            elif ev.name == f"domain-tag-add:{scope.dump}":
                enrolled.discard(about)  # a hybrid is in no scope (fail closed)
            view = (
                redact.event_view(about, ev.name, ev.kwargs, scope) if about in enrolled else None
            )
            if ev.name in (f"domain-tag-delete:{scope.managed}", "domain-delete"):
                enrolled.discard(about)
            if view is not None and (only is None or about == only):
                view["ts"] = round(time.time(), 3)
                events.append(view)
                if len(events) >= MAX_EVENTS:
                    return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(collect(), max(0.0, deadline - time.monotonic()))
    await stream.aclose()
    return {"seconds": seconds, "events": events, "truncated": len(events) >= MAX_EVENTS}
