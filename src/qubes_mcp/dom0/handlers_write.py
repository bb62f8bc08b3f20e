"""State-changing operations other than creation: power, commands, copies, firewall,
properties, features, devices, removal. Each reads back what it changed where it can."""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

from qubes_mcp.dom0.admin import QubesdError
from qubes_mcp.dom0.audit.clean import Argv
from qubes_mcp.dom0.context import Context, Handler
from qubes_mcp.dom0.copy import (
    INCOMING_DIR_NAME,
    QFILE_AGENT,
    QFILE_UNPACKER,
    QUBE_USER,
    QUBE_USER_HOME,
    QUBE_USER_UID,
    CopyLimits,
    failure_message,
    failure_reason,
    relay_copy,
)
from qubes_mcp.dom0.decide import target_needs
from qubes_mcp.dom0.errors import FailedError, GateError, InvalidInputError, InvalidStateError
from qubes_mcp.dom0.firewall import render_rules
from qubes_mcp.dom0.reader import parse_vm_list_line, property_value
from qubes_mcp.dom0.relay import RunResult, new_run_id, run_argv, run_command

log = logging.getLogger("qubes_mcp.gate")


def _power(method: str, arg: str = "") -> Handler:
    async def handler(ctx: Context) -> dict[str, Any]:
        await ctx.qubesd(ctx.target, method, arg)
        try:
            line = (await ctx.admin.lines(ctx.target, "admin.vm.List"))[0]
        except QubesdError as exc:
            # a disposable is removed by qubesd itself once it halts (auto_cleanup): gone is
            # the outcome the agent asked for, not a failure
            target = ctx.facts.get(ctx.target)
            if exc.exc_class == "QubesVMNotFoundError" and target and target.klass == "DispVM":
                return {"qube": ctx.target, "state": "Removed"}
            raise
        return {"qube": ctx.target, "state": parse_vm_list_line(line)[1].get("state", "")}

    return handler


qube_start = _power("admin.vm.Start")
qube_pause = _power("admin.vm.Pause")
qube_unpause = _power("admin.vm.Unpause")
qube_kill = _power("admin.vm.Kill")


async def qube_shutdown(ctx: Context) -> dict[str, Any]:
    arg = "force+wait" if ctx.args.get("force") else "wait"
    return await _power("admin.vm.Shutdown", arg)(ctx)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


async def relay(ctx: Context, qube: str, argv: list[str], data: bytes, timeout: int) -> RunResult:
    """Relay one command through dom0's line to ``qube``, within the configured bounds.

    Every command an agent runs passes here, so this is where the audit log learns what ran:
    the command line's SHA-256 and size, and with ``[audit] commands = "argv"`` the argv
    itself (escaped and capped by the log, audit.clean.Argv); stdin's size and SHA-256; the
    exit code and the output sizes — never the output.
    It starts the qube first, like ``qvm-run`` (qrexec-client does not), unless this
    request's facts read it as Running (``admin.vm.Start`` would be a no-op there and costs a
    qubesd round trip; Context.running_as_read). It marks the run with the request id (how
    a later gate finds its processes in the qube, :func:`~qubes_mcp.dom0.relay.cancel_in_qube`).
    """
    limits = ctx.config.limits
    command = "\0".join(argv).encode()
    ctx.detail.update(
        command_sha256=hashlib.sha256(command).hexdigest(),
        command_bytes=len(command),
        stdin_bytes=len(data),
        stdin_sha256=hashlib.sha256(data).hexdigest(),
    )
    if ctx.config.audit.commands == "argv":
        ctx.detail["argv"] = Argv(tuple(argv), ctx.config.audit.argv_bytes)
    if not ctx.running_as_read(qube):
        await ctx.qubesd(qube, "admin.vm.Start")
    result = await run_command(
        ctx.config.paths.qrexec_client,
        qube,
        argv,
        stdin=data,
        run_id=ctx.request_id or None,
        timeout=min(timeout, limits.run_timeout),
        limit=limits.output_bytes,
    )
    ctx.detail.update(
        run_id=result.run_id,
        exit_code=result.exit_code,
        stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes,
    )
    return result


def command_reply(qube: str, result: RunResult, output: str = "text") -> dict[str, Any]:
    """A command's outcome for the agent: text (UTF-8, bad bytes replaced) or exact base64."""
    encode = _text if output == "text" else (lambda b: base64.b64encode(b).decode("ascii"))
    return {
        "qube": qube,
        "exit_code": result.exit_code,
        ("stdout" if output == "text" else "stdout_base64"): encode(result.stdout),
        ("stderr" if output == "text" else "stderr_base64"): encode(result.stderr),
        "truncated": result.truncated,
        "timed_out": result.timed_out,
    }


async def run_in(
    ctx: Context, qube: str, argv: list[str], stdin: str, timeout: int
) -> dict[str, Any]:
    """Run ``argv`` with text on stdin; the text reply."""
    return command_reply(qube, await relay(ctx, qube, argv, stdin.encode(), timeout))


async def run_request(ctx: Context, qube: str) -> dict[str, Any]:
    """A ``qube.run``/``disposable.run`` request: stdin as text or base64, output as asked."""
    a = ctx.args
    data = base64.b64decode(a["stdin_base64"]) if a.get("stdin_base64") else a["stdin"].encode()
    result = await relay(ctx, qube, a["command"], data, a["timeout"])
    return command_reply(qube, result, a.get("output", "text"))


async def qube_run(ctx: Context) -> dict[str, Any]:
    return await run_request(ctx, ctx.target)


async def file_copy(ctx: Context) -> dict[str, Any]:
    """Relay a copy through dom0 (see :mod:`qubes_mcp.dom0.copy`): no qube calls another.

    Every outcome that is not "all files landed and the receiver confirmed every byte" is a
    ``failed`` refusal (so the audit outcome says ``failed`` too); the detail records what
    moved either way.
    """
    a = ctx.args
    source, dest, paths = ctx.target, a["destination"], list(a["paths"])
    if any(not p.startswith("/") for p in paths):
        raise InvalidInputError("paths: each path must be absolute", reason="relative copy path")
    incoming = f"{QUBE_USER_HOME}/{INCOMING_DIR_NAME}/{source}"
    ctx.detail.update(source=source, dest=dest, paths=paths, files=0, bytes=0)
    limits = ctx.config.limits
    line = ctx.config.paths.qrexec_client
    run_id = ctx.request_id or new_run_id()
    for qube in (source, dest):  # qrexec-client starts no qube (qvm-run does): a no-op if up
        await ctx.qubesd(qube, "admin.vm.Start")

    def argv(qube: str, words: list[str], user: str) -> list[str]:
        """Both halves run bounded and marked with the request id, like every command."""
        return run_argv(line, qube, words, run_id=run_id, timeout=limits.run_timeout, user=user)

    async def prepared() -> bool:
        # qfile-unpacker takes an existing directory when dom0 names it: make it as the user
        # would get it from the qubes.Filecopy service (~/QubesIncoming and <source>, 0700)
        made = await run_command(
            line,
            dest,
            ["mkdir", "-p", "-m", "0700", "--", f"{QUBE_USER_HOME}/{INCOMING_DIR_NAME}", incoming],
            stdin=b"",
            timeout=limits.run_timeout,
            limit=4096,
            user=QUBE_USER,
            run_id=run_id,
        )
        return made.exit_code == 0

    caps = CopyLimits(limits.copy_bytes, limits.copy_files, limits.run_timeout)
    outcome = await relay_copy(
        argv(source, [QFILE_AGENT, "--", *paths], "root"),
        argv(dest, [QFILE_UNPACKER, str(QUBE_USER_UID), incoming], QUBE_USER),
        caps,
        ready=prepared(),
    )
    ctx.detail.update(files=outcome.files, bytes=outcome.content_bytes)
    message = failure_message(outcome, caps)
    if message is not None:
        raise FailedError(message, reason=failure_reason(outcome))
    return {
        "source": source,
        "destination": dest,
        "paths": paths,
        "copied": True,
        "files": outcome.files,
        "bytes": outcome.content_bytes,
        "landed_in": f"{incoming}/",
    }


async def firewall_set(ctx: Context) -> dict[str, Any]:
    rules = ctx.args["rules"]
    payload = render_rules(rules)
    ctx.detail["rule_count"] = len(rules)
    await ctx.qubesd(ctx.target, "admin.vm.firewall.Set", payload=payload)
    await ctx.qubesd(ctx.target, "admin.vm.firewall.Reload")
    if (await ctx.qubesd(ctx.target, "admin.vm.firewall.Get")).encode() != payload:
        raise FailedError(reason="firewall read-back differs")
    return {"qube": ctx.target, "rules": len(rules)}


async def property_set(ctx: Context) -> dict[str, Any]:
    prop, value = ctx.args["property"], ctx.args["value"]
    ctx.detail["property"] = prop
    await ctx.qubesd(
        ctx.target, "admin.vm.property.Set", prop, b"" if value is None else value.encode("ascii")
    )
    got = await ctx.qubesd(ctx.target, "admin.vm.property.Get", prop)
    if property_value(got) != ("" if value is None else value):
        raise FailedError(reason="property read-back differs")
    return {"qube": ctx.target, "property": prop, "value": value}


async def feature_set(ctx: Context) -> dict[str, Any]:
    name, value = ctx.args["feature"], ctx.args["value"]
    ctx.detail["feature"] = name
    await ctx.qubesd(ctx.target, "admin.vm.feature.Set", name, value.encode("ascii"))
    return {"qube": ctx.target, "feature": name, "value": value}


def _device_payload(devclass: str, backend: str, port: str, frontend: str, ro: bool) -> bytes:
    fields = {
        "device_id": "*",
        "port_id": port,
        "devclass": devclass,
        "backend_domain": backend,
        "mode": "manual",
        "frontend_domain": frontend,
    }
    if ro:  # decide allows it for block devices only (the USB proxy takes no options)
        fields["_read-only"] = "yes"
    return " ".join(f"{k}='{v}'" for k, v in fields.items()).encode("ascii")


async def device_attach(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    devclass = a["devclass"]
    ctx.detail.update(device=a["device"], source=a["backend"], device_class=devclass)
    await ctx.qubesd(
        ctx.target,
        f"admin.vm.device.{devclass}.Attach",
        f"{a['backend']}+{a['device']}+_",
        _device_payload(devclass, a["backend"], a["device"], ctx.target, a["read_only"]),
    )
    return {
        "frontend": ctx.target,
        "backend": a["backend"],
        "device": a["device"],
        "devclass": devclass,
        "read_only": a["read_only"],
    }


async def device_detach(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    devclass = a["devclass"]
    ctx.detail.update(device=a["device"], source=a["backend"], device_class=devclass)
    await ctx.qubesd(
        ctx.target, f"admin.vm.device.{devclass}.Detach", f"{a['backend']}+{a['device']}+_"
    )
    return {
        "frontend": ctx.target,
        "backend": a["backend"],
        "device": a["device"],
        "devclass": devclass,
    }


async def qube_remove(ctx: Context) -> dict[str, Any]:
    """Remove the qube, then unregister it, which takes its lines out of the policy -- its
    lab links' lines too (``links_closed`` in the audit detail).

    The audit records the tier the removal needed (``tier_needed``: exec when the principal
    created the qube, ``decide.created_by``). If the registry cannot be changed once the qube
    is gone, the removal still happened and is reported; the registration is stale (its uuid
    is gone, so it admits nothing) and the gate's reconcile drops it on ``domain-delete``.
    """
    q = ctx.facts.get(ctx.target)
    assert q is not None
    ctx.detail["tier_needed"] = target_needs(ctx.verdict.op, ctx.principal, q).word
    await ctx.qubesd(ctx.target, "admin.vm.Remove")
    try:
        closed = await ctx.leave_scope(ctx.target)
        if closed:  # its lab links went with it, in the same policy commit
            ctx.detail["links_closed"] = closed
    except GateError as exc:
        ctx.detail["error_class"] = type(exc).__name__
        log.warning("qubes-mcp gate: %s removed but not unregistered: %s", ctx.target, exc.reason)
    return {"qube": ctx.target, "removed": True}


#: the private volume: what a revert puts back (root is the template's, volatile is not kept)
REVERT_VOLUME = "private"


async def qube_revert(ctx: Context) -> dict[str, Any]:
    """Put the private volume back to a revision (``admin.vm.volume.Revert``).

    The revision is checked against ``admin.vm.volume.ListSnapshots`` first, so an unknown
    one is a clear refusal rather than qubesd's empty reply; none given means the newest, as
    ``qvm-volume revert`` does. The pool's driver does the rest: R4.3's ``file-reflink`` and
    ``lvm_thin`` keep the current state as a new revision (so a revert can be undone), the
    ``file`` driver cannot revert at all (``failed``)."""
    listing = await ctx.qubesd(ctx.target, "admin.vm.volume.ListSnapshots", REVERT_VOLUME)
    listed = listing.splitlines()
    revision = ctx.args.get("revision")
    ctx.detail["volume"] = REVERT_VOLUME
    if revision is None:
        if not listed:
            raise InvalidStateError(
                "the qube has no revision to revert to (one is kept when it shuts down, if its "
                "private volume keeps revisions)",
                reason="no revisions",
            )
        revision = listed[-1]
    ctx.detail["revision"] = revision
    if revision not in listed:
        raise InvalidInputError("no such revision of the private volume (see qube.info)")
    await ctx.qubesd(ctx.target, "admin.vm.volume.Revert", REVERT_VOLUME, revision.encode("ascii"))
    return {"qube": ctx.target, "volume": REVERT_VOLUME, "revision": revision}
