"""State-changing operations other than creation: power, commands, copies, firewall,
properties, features, devices, removal. Each reads back what it changed where it can."""

from __future__ import annotations

import hashlib
from typing import Any

from qubes_mcp.dom0.context import Context, Handler
from qubes_mcp.dom0.errors import FailedError
from qubes_mcp.dom0.firewall import render_rules
from qubes_mcp.dom0.reader import parse_vm_list_line, property_value
from qubes_mcp.dom0.relay import run_command


def _power(method: str, arg: str = "") -> Handler:
    async def handler(ctx: Context) -> dict[str, Any]:
        await ctx.qubesd(ctx.target, method, arg)
        line = (await ctx.admin.lines(ctx.target, "admin.vm.List"))[0]
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


async def run_in(
    ctx: Context, qube: str, argv: list[str], stdin: str, timeout: int
) -> dict[str, Any]:
    """Relay one command through dom0's qrexec-client, bounded in the qube; only digests,
    sizes and the run id (the request id: how a later gate finds the run's processes in the
    qube, :func:`~qubes_mcp.dom0.relay.cancel_in_qube`) reach the audit log.
    Like ``qvm-run``, start the qube first (qrexec-client does not; a no-op when running)."""
    data = stdin.encode()
    limits = ctx.config.limits
    command = "\0".join(argv).encode()
    ctx.detail.update(
        command_sha256=hashlib.sha256(command).hexdigest(),
        command_bytes=len(command),
        stdin_bytes=len(data),
    )
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
    return {
        "qube": qube,
        "exit_code": result.exit_code,
        "stdout": _text(result.stdout),
        "stderr": _text(result.stderr),
        "truncated": result.truncated,
        "timed_out": result.timed_out,
    }


async def qube_run(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    return await run_in(ctx, ctx.target, a["command"], a["stdin"], a["timeout"])


async def file_copy(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    ctx.detail.update(dest=a["destination"], files=len(a["paths"]))
    result = await run_in(
        ctx,
        ctx.target,
        ["qvm-copy-to-vm", a["destination"], *a["paths"]],
        "",
        ctx.config.limits.run_timeout,
    )
    return {
        "source": ctx.target,
        "destination": a["destination"],
        "paths": a["paths"],
        "copied": result["exit_code"] == 0,
        "exit_code": result["exit_code"],
        "stderr": result["stderr"],
        "landed_in": f"/home/user/QubesIncoming/{ctx.target}/",
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


def _device_payload(backend: str, port: str, frontend: str, read_only: bool) -> bytes:
    fields = {
        "device_id": "*",
        "port_id": port,
        "devclass": "block",
        "backend_domain": backend,
        "mode": "manual",
        "frontend_domain": frontend,
    }
    if read_only:
        fields["_read-only"] = "yes"
    return " ".join(f"{k}='{v}'" for k, v in fields.items()).encode("ascii")


async def device_attach(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    ctx.detail.update(device=a["device"], source=a["backend"], device_class="block")
    await ctx.qubesd(
        ctx.target,
        "admin.vm.device.block.Attach",
        f"{a['backend']}+{a['device']}+_",
        _device_payload(a["backend"], a["device"], ctx.target, a["read_only"]),
    )
    return {
        "frontend": ctx.target,
        "backend": a["backend"],
        "device": a["device"],
        "read_only": a["read_only"],
    }


async def device_detach(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    ctx.detail.update(device=a["device"], source=a["backend"], device_class="block")
    await ctx.qubesd(ctx.target, "admin.vm.device.block.Detach", f"{a['backend']}+{a['device']}+_")
    return {"frontend": ctx.target, "backend": a["backend"], "device": a["device"]}


async def qube_remove(ctx: Context) -> dict[str, Any]:
    await ctx.qubesd(ctx.target, "admin.vm.Remove")
    return {"qube": ctx.target, "removed": True}
