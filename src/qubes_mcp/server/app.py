"""The FastMCP application: which tools are registered, and the capabilities view.

``build_server`` is the one place a server is assembled (the CLI, the tests and the benchmark
all use it). Tool selection (``--read-only``, ``--tools``, ``--disable``) only trims what the
agent is offered; it is a convenience for the operator, not a control (dom0 decides).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import cast

from fastmcp import Context, FastMCP

from qubes_mcp import __version__
from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.registry import GROUPS, ToolDef, register
from qubes_mcp.server.tools_act import act_tools
from qubes_mcp.server.tools_admin import admin_tools
from qubes_mcp.server.tools_plan import plan_tools
from qubes_mcp.server.tools_read import read_tools
from qubes_mcp.server.transport import Timeouts, Transport

CAPABILITIES_URI = "qubes://capabilities"

INSTRUCTIONS = """\
Operate qubes (isolated VMs) on a Qubes OS machine; dom0 decides every call. Start with \
qube_list: your qubes, your tier on each, your name_prefix for new qubes. Tiers are \
cumulative, read < exec < net < full; each tool ends with the tier it needs, on which \
argument. A refusal reads '<code>: <message>'; 'not-found: no such qube, or not yours' is the \
same for a missing qube and one outside your scope. Calls that "waits for the operator's \
approval", and changes to guarded qubes, wait for the operator in dom0; no answer in time is \
a refusal."""


class UnknownGroupError(ValueError):
    """``--tools``/``--disable`` named a group that does not exist."""


class Capabilities(models.QubeList):
    #: each registered tool → the tier it needs on the qube it is about
    tools: dict[str, str]


def all_tool_defs(gw: Gateway) -> list[ToolDef]:
    """Every tool this server can offer, in documentation order."""
    return [*read_tools(gw), *act_tools(gw), *admin_tools(gw), *plan_tools(gw)]


def select_groups(
    tools: Iterable[str] | None = None, disable: Iterable[str] = (), *, read_only: bool = False
) -> frozenset[str]:
    """The groups to register.

    Raises:
        UnknownGroupError: a name is not one of :data:`GROUPS`.
    """
    chosen = set(GROUPS if tools is None else tools)
    off = set(disable)
    unknown = (chosen | off) - set(GROUPS)
    if unknown:
        raise UnknownGroupError(
            f"unknown tool group(s): {', '.join(sorted(unknown))} (known: {', '.join(GROUPS)})"
        )
    if not chosen - off:
        raise UnknownGroupError("these --tools/--disable choices leave no tool to offer")
    return frozenset(chosen - off)


def build_server(
    transport: Transport,
    *,
    groups: frozenset[str] | None = None,
    read_only: bool = False,
    timeouts: Timeouts | None = None,
) -> FastMCP:
    """A FastMCP server whose tools call dom0 through ``transport``.

    Args:
        transport: how calls reach the gate.
        groups: tool groups to offer (default: all).
        read_only: offer only tools whose operation is read-only.
        timeouts: transport timeouts (default: the gate's defaults).
    """
    gw = Gateway(transport, timeouts or Timeouts())
    mcp = FastMCP(
        "qubes-mcp", instructions=INSTRUCTIONS, version=__version__, mask_error_details=True
    )
    wanted = frozenset(GROUPS) if groups is None else groups
    defs = [
        d
        for d in all_tool_defs(gw)
        if d.group in wanted and (not read_only or (d.op is not None and d.op.read_only))
    ]
    needs = {d.tool_name: d.op.needs for d in defs if d.op is not None}

    async def capabilities(ctx: Context | None = None) -> Capabilities:
        listed = await gw.call(ctx, "qube.list")
        return cast(Capabilities, {**listed, "tools": needs})

    async def capabilities_get(ctx: Context) -> Capabilities:
        """qube_list plus each tool's tier (also the resource qubes://capabilities)."""
        return await capabilities(ctx)

    if "read" in wanted:
        defs.append(ToolDef(capabilities_get, "read", None, name="capabilities_get"))

        @mcp.resource(
            CAPABILITIES_URI,
            name="capabilities",
            description="Your qubes, your tier on each, and the tools offered (JSON).",
            mime_type="application/json",
        )
        async def capabilities_resource() -> str:
            return json.dumps(await capabilities(None), sort_keys=True)

    register(mcp, defs)
    return mcp
