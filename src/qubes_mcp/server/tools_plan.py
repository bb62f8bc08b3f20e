"""Plans: propose a whole change (dom0 checks every step, nothing happens), then apply it with
one operator approval. The gate re-decides each step with fresh facts as it runs."""

from __future__ import annotations

from typing import Annotated, cast

from fastmcp import Context
from pydantic import Field
from typing_extensions import TypedDict

from qubes_mcp.server import models
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.params import PRINTABLE_PATTERN, QUBE_NAME_PATTERN
from qubes_mcp.server.registry import ToolDef

HEX16 = r"^[0-9a-f]{16}$"


class Step(TypedDict):
    """One step: the operation (as in the gate's table), its qube, its arguments."""

    op: Annotated[
        str,
        Field(
            max_length=32,
            pattern=r"^[a-z]+\.[a-z_]+$",
            description="a state-changing operation, e.g. qube.create, qube.run, "
            "property.set, qube.remove (the tool names with '.' for '_')",
        ),
    ]
    target: Annotated[
        str | None,
        Field(
            max_length=31,
            pattern=QUBE_NAME_PATTERN,
            description="the qube the step is about (the tool's qube/template/source "
            "argument); null for global operations",
        ),
    ]
    args: Annotated[
        dict[str, object],
        Field(description="the operation's other arguments, as its own tool takes them"),
    ]


def plan_tools(gw: Gateway) -> list[ToolDef]:
    async def plan_propose(
        steps: Annotated[
            list[Step], Field(min_length=1, max_length=32, description="the steps, in order")
        ],
        ctx: Context,
        title: Annotated[
            str,
            Field(
                max_length=200,
                pattern=PRINTABLE_PATTERN,
                description="what the plan is for, shown to the operator",
            ),
        ] = "",
    ) -> models.PlanProposal:
        """Check a whole change before doing any of it. dom0 decides every step now (a step
        about a qube an earlier step creates is 'deferred'); nothing changes. If no step is
        refused you get a plan_id and digest for plan_apply."""
        payload = {"steps": [dict(s) for s in steps], "title": title}
        return cast(models.PlanProposal, await gw.call(ctx, "plan.propose", payload=payload))

    async def plan_apply(
        plan_id: Annotated[
            str, Field(max_length=16, pattern=HEX16, description="the id plan_propose returned")
        ],
        digest: Annotated[
            str, Field(max_length=16, pattern=HEX16, description="the digest plan_propose returned")
        ],
        ctx: Context,
    ) -> models.PlanResult:
        """Apply a proposed plan step by step, stopping at the first refusal. If any step needs
        the operator, dom0 asks once for the whole plan; steps already done are not undone."""
        payload = {"plan_id": plan_id, "digest": digest}
        return cast(models.PlanResult, await gw.call(ctx, "plan.apply", payload=payload))

    return [
        ToolDef(plan_propose, "read", gw.table.op("plan.propose")),
        ToolDef(plan_apply, "plan", gw.table.op("plan.apply")),
    ]
