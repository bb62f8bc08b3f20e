"""Plans: propose a whole change (dom0 checks every step, nothing happens), then apply it with
one operator approval. The gate re-decides each step with fresh facts as it runs."""

from __future__ import annotations

from typing import Annotated, cast

from fastmcp import Context
from pydantic import Field
from typing_extensions import TypedDict

from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.params import PRINTABLE_PATTERN
from qubes_mcp.server.registry import ToolDef

HEX16 = r"^[0-9a-f]{16}$"


# One step of a plan: the operation (as in the gate's table), its qube, its arguments. (A
# comment, not a docstring: pydantic would repeat a docstring in every tool listing.)
class Step(TypedDict):
    op: Annotated[
        str,
        Field(
            max_length=32,
            pattern=r"^[a-z]+\.[a-z_]+$",
            description="a tool name, '.' for '_': qube.run",
        ),
    ]
    target: Annotated[
        str | None,
        Field(
            max_length=31,
            description="the tool's first argument, or null",
        ),
    ]
    args: Annotated[
        dict[str, object],
        Field(description="its other arguments"),
    ]


def plan_tools(gw: Gateway) -> list[ToolDef]:
    async def plan_propose(
        steps: Annotated[list[Step], Field(min_length=1, max_length=32, description=None)],
        ctx: Context,
        title: Annotated[
            str,
            Field(
                max_length=200,
                pattern=PRINTABLE_PATTERN,
                description="shown to the operator",
            ),
        ] = "",
    ) -> models.PlanProposal:
        """Check a change without doing it: dom0 decides each step now ('deferred' if an
        earlier step creates its qube); if none is refused, a plan_id and digest to apply."""
        payload = {"steps": [dict(s) for s in steps], "title": title}
        return cast(models.PlanProposal, await gw.call(ctx, "plan.propose", payload=payload))

    async def plan_apply(
        plan_id: Annotated[str, Field(max_length=16, pattern=HEX16, description=None)],
        digest: Annotated[str, Field(max_length=16, pattern=HEX16, description=None)],
        ctx: Context,
    ) -> models.PlanResult:
        """Apply a proposed plan, stopping at the first refusal (done steps stay done)."""
        payload = {"plan_id": plan_id, "digest": digest}
        return cast(models.PlanResult, await gw.call(ctx, "plan.apply", payload=payload))

    return [
        ToolDef(plan_propose, "read", gw.table.op("plan.propose")),
        ToolDef(plan_apply, "plan", gw.table.op("plan.apply")),
    ]
