"""Tools that act inside existing qubes: power, commands, file copies, firewall, lab links."""

from __future__ import annotations

from typing import Annotated, Literal, cast

from fastmcp import Context
from pydantic import Field

from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.params import (
    Command,
    FirewallRule,
    Output,
    Path,
    Qube,
    Stdin,
    StdinBase64,
    Timeout,
    qube_param,
)
from qubes_mcp.server.registry import ToolDef

#: a lab link's port: the server's 127.0.0.1:PORT, bound to the client's localhost:PORT
LinkPort = Annotated[
    int, Field(ge=1, le=65535, description="the TCP port (same number on both sides)")
]


def act_tools(gw: Gateway) -> list[ToolDef]:
    """The power, exec, files and network groups, bound to ``gw``."""
    table = gw.table

    async def qube_start(qube: Qube, ctx: Context) -> models.PowerState:
        """Start a qube (and its network qubes)."""
        return cast(models.PowerState, await gw.call(ctx, "qube.start", qube))

    async def qube_shutdown(
        qube: Qube,
        ctx: Context,
        force: Annotated[bool, Field(description="even if qubes use its network")] = False,
    ) -> models.PowerState:
        """Shut a qube down cleanly."""
        return cast(models.PowerState, await gw.call(ctx, "qube.shutdown", qube, {"force": force}))

    async def qube_pause(qube: Qube, ctx: Context) -> models.PowerState:
        """Pause a running qube."""
        return cast(models.PowerState, await gw.call(ctx, "qube.pause", qube))

    async def qube_unpause(qube: Qube, ctx: Context) -> models.PowerState:
        """Unpause a paused qube."""
        return cast(models.PowerState, await gw.call(ctx, "qube.unpause", qube))

    async def qube_kill(qube: Qube, ctx: Context) -> models.PowerState:
        """Kill a qube at once (unsaved state is lost)."""
        return cast(models.PowerState, await gw.call(ctx, "qube.kill", qube))

    async def qube_run(
        qube: Qube,
        command: Command,
        ctx: Context,
        *,
        stdin: Stdin = "",
        stdin_base64: StdinBase64 = "",
        output: Output = "text",
        timeout: Timeout = 60,
    ) -> models.CommandResult:
        """Run a command as root in a qube (started if needed); output capped by dom0,
        exit_code null if timed out."""
        payload: dict[str, object] = {"command": command, "stdin": stdin, "timeout": timeout}
        if stdin_base64:
            payload["stdin_base64"] = stdin_base64
        if output != "text":
            payload["output"] = output
        return cast(models.CommandResult, await gw.call(ctx, "qube.run", qube, payload))

    async def template_update(
        template: Annotated[str, qube_param("")],
        ctx: Context,
        timeout: Annotated[int, Field(ge=60, le=3600, description="seconds")] = 900,
    ) -> models.TemplateUpdateResult:
        """Update a template's packages through your egress qube, then shut it down;
        reports what changed."""
        payload = {"timeout": timeout}
        return cast(
            models.TemplateUpdateResult, await gw.call(ctx, "template.update", template, payload)
        )

    async def file_read(
        qube: Qube,
        path: Path,
        ctx: Context,
        offset: Annotated[int, Field(ge=0, le=1 << 62, description=None)] = 0,
        length: Annotated[int, Field(ge=1, le=1 << 30, description=None)] = 1 << 20,
    ) -> models.FileReadResult:
        """A file's bytes (base64) from offset; read on from offset+length until eof."""
        payload = {"path": path, "offset": offset, "length": length}
        return cast(models.FileReadResult, await gw.call(ctx, "file.read", qube, payload))

    async def file_write(
        qube: Qube,
        path: Path,
        data: Annotated[str, Field(max_length=1 << 20, description="base64")],
        ctx: Context,
        mode: Annotated[
            Literal["create", "overwrite", "append"],
            Field(description="create refuses an existing file"),
        ] = "create",
    ) -> models.FileWriteResult:
        """Write bytes to a file in a qube."""
        payload = {"path": path, "data": data, "mode": mode}
        return cast(models.FileWriteResult, await gw.call(ctx, "file.write", qube, payload))

    async def file_copy(
        source: Annotated[str, qube_param("")],
        destination: Annotated[str, qube_param("")],
        paths: Annotated[
            list[Annotated[str, Field(max_length=4096)]],
            Field(min_length=1, max_length=64, description="absolute paths"),
        ],
        ctx: Context,
    ) -> models.CopyResult:
        """Copy files between qubes, into ~/QubesIncoming/<source>/."""
        payload = {"destination": destination, "paths": paths}
        return cast(models.CopyResult, await gw.call(ctx, "file.copy", source, payload))

    async def firewall_set(
        qube: Qube,
        rules: Annotated[
            list[FirewallRule],
            Field(max_length=256, description="first match wins"),
        ],
        ctx: Context,
    ) -> models.FirewallSetResult:
        """Replace a qube's whole firewall rule list."""
        payload = {"rules": rules}
        return cast(models.FirewallSetResult, await gw.call(ctx, "firewall.set", qube, payload))

    async def link_open(
        client: Annotated[str, qube_param("the qube that connects (localhost:PORT there)")],
        server: Annotated[str, qube_param("the qube whose 127.0.0.1:PORT it reaches")],
        port: LinkPort,
        ctx: Context,
    ) -> models.LinkOpenResult:
        """Open a lab link: localhost:PORT in the client reaches 127.0.0.1:PORT in the server
        through qrexec (qubes.ConnectTCP), and nothing else -- no outside network. Open it
        again after the client restarts to start its listener again."""
        payload = {"server": server, "port": port}
        return cast(models.LinkOpenResult, await gw.call(ctx, "link.open", client, payload))

    async def link_close(
        client: Annotated[str, qube_param("the link's client qube")],
        server: Annotated[str, qube_param("the link's server qube")],
        port: LinkPort,
        ctx: Context,
    ) -> models.LinkCloseResult:
        """Close a lab link: the client can no longer reach the server's port."""
        payload = {"server": server, "port": port}
        return cast(models.LinkCloseResult, await gw.call(ctx, "link.close", client, payload))

    return [
        ToolDef(fn, group, table.op(op))
        for op, group, fn in (
            ("qube.start", "power", qube_start),
            ("qube.shutdown", "power", qube_shutdown),
            ("qube.pause", "power", qube_pause),
            ("qube.unpause", "power", qube_unpause),
            ("qube.kill", "power", qube_kill),
            ("qube.run", "exec", qube_run),
            ("template.update", "exec", template_update),
            ("file.read", "files", file_read),
            ("file.write", "files", file_write),
            ("file.copy", "files", file_copy),
            ("firewall.set", "network", firewall_set),
            ("link.open", "network", link_open),
            ("link.close", "network", link_close),
        )
    ]
