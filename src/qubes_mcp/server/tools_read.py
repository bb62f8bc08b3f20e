"""Read tools: what the agent may see of its qubes (tier read)."""

from __future__ import annotations

from typing import Annotated, cast

from fastmcp import Context
from pydantic import Field

from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.params import Qube, qube_param
from qubes_mcp.server.registry import ToolDef


def read_tools(gw: Gateway) -> list[ToolDef]:
    """The read group, bound to ``gw``."""
    table = gw.table

    async def qube_list(ctx: Context) -> models.QubeList:
        """Your qubes, your tier on each, your create rights.

        Start here: every other tool takes one of these names.
        """
        return cast(models.QubeList, await gw.call(ctx, "qube.list"))

    async def qube_info(qube: Qube, ctx: Context) -> models.QubeInfo:
        """A qube's properties, scope tags, features and volume sizes."""
        return cast(models.QubeInfo, await gw.call(ctx, "qube.info", qube))

    async def firewall_get(qube: Qube, ctx: Context) -> models.FirewallRules:
        """A qube's firewall rules (first match wins)."""
        return cast(models.FirewallRules, await gw.call(ctx, "firewall.get", qube))

    async def devices_list(qube: Qube, ctx: Context) -> models.Devices:
        """Block and USB devices a qube exposes, and those attached to it."""
        return cast(models.Devices, await gw.call(ctx, "devices.list", qube))

    async def events_watch(
        ctx: Context,
        seconds: Annotated[int, Field(ge=1, le=3600, description="dom0 may shorten it")] = 10,
        qube: Annotated[str | None, qube_param("only this qube")] = None,
    ) -> models.Events:
        """Events about your qubes (power, property changes …) for a while."""
        payload: dict[str, object] = {"seconds": seconds}
        if qube is not None:
            payload["qube"] = qube
        return cast(models.Events, await gw.call(ctx, "events.watch", payload=payload))

    async def budget_get(ctx: Context) -> models.Budget:
        """Your storage budget (bytes used, cap, free) and qube count."""
        return cast(models.Budget, await gw.call(ctx, "budget.get"))

    async def qube_log(
        qube: Qube,
        ctx: Context,
        lines: Annotated[int, Field(ge=1, le=2000, description="how many of the last lines")] = 100,
    ) -> models.LogResult:
        """Read the last lines of a qube's console log, kept by dom0: readable after the
        qube halted or crashed. Bytes that are not printable ASCII come escaped (\\xNN)."""
        return cast(models.LogResult, await gw.call(ctx, "qube.log", qube, {"lines": lines}))

    async def link_list(ctx: Context) -> models.LinkList:
        """List the lab links you opened (both qubes still in your scope)."""
        return cast(models.LinkList, await gw.call(ctx, "link.list"))

    return [
        ToolDef(fn, "read", table.op(op))
        for op, fn in (
            ("qube.list", qube_list),
            ("qube.info", qube_info),
            ("firewall.get", firewall_get),
            ("devices.list", devices_list),
            ("events.watch", events_watch),
            ("budget.get", budget_get),
            ("qube.log", qube_log),
            ("link.list", link_list),
        )
    ]
