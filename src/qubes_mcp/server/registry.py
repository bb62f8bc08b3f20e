"""How a hand-written tool function becomes an MCP tool: name, group, annotations, description.

Annotations and the tier line of every description are derived from the operations table, so
they cannot drift from what the gate enforces; the argument schemas are hand-written (for good
schemas) and a test compares them with the table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastmcp import FastMCP
from mcp.types import ToolAnnotations

from qubes_mcp.server.groups import GROUPS
from qubes_mcp.server.table import OpSpec

__all__ = ["EXTRA_TOOLS", "GROUPS", "ToolDef", "describe", "register", "tool_annotations"]

#: tools that are not one operation each (documented in docs/tools.md)
EXTRA_TOOLS = ("capabilities_get",)


def tool_name(op_name: str) -> str:
    """``qube.list`` → ``qube_list``: one tool per operation, named after it."""
    return op_name.replace(".", "_")


@dataclass(frozen=True)
class ToolDef:
    """One tool before registration."""

    fn: Callable[..., Any]
    group: str
    op: OpSpec | None = None  #: None for the extra tools
    name: str = ""
    description: str = ""
    read_only: bool = True

    @property
    def tool_name(self) -> str:
        return self.name or tool_name(self.op.name if self.op else self.fn.__name__)


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def target_argument(fn: Callable[..., Any]) -> str:
    """The name of the argument that names the qube a tool is about (``qube``, ``template``)."""
    return next(iter(inspect.signature(fn).parameters))


def tier_line(op: OpSpec, target: str) -> str:
    """``Tier: exec on qube, exec on destination (or a dump sink).``: what dom0 checks, named
    by the arguments the tool really takes."""
    if op.name == "plan.apply":
        return "Tier: what each step needs; one approval for the whole plan if a step needs one."
    parts = [] if op.is_global else [f"{op.needs} on {target}"]
    if op.creator_needs is not None:
        parts[-1] += f"; {op.creator_needs} if you created it"
    for ref in op.refs:
        parts.append(
            f"{ref.needs} on {ref.field}" + (" (or a dump sink)" if ref.allow_dump else "")
        )
    line = "Tier: " + (", ".join(parts) if parts else op.needs)
    if op.consent:
        line += "; waits for the operator's approval"
    return line + "."


def describe(op: OpSpec, doc: str | None, target: str = "qube") -> str:
    """What an agent reads about one tool: what it does and what dom0 checks. The rules every
    tool shares (tiers, refusals, consent) are stated once, in the server's instructions."""
    return f"{_first_paragraph(doc) or op.summary + '.'}\n{tier_line(op, target)}"


def tool_annotations(op: OpSpec) -> ToolAnnotations:
    """Honest hints from the table: ``openWorldHint`` is the table's ``open_world`` (what the
    tool runs can reach the network through the egress when the qube is networked); no other
    tool reaches outside the machine's qubes."""
    return ToolAnnotations(
        read_only_hint=op.read_only,
        destructive_hint=op.destructive,
        idempotent_hint=op.idempotent,
        open_world_hint=op.open_world,
    )


def register(mcp: FastMCP, defs: Iterable[ToolDef]) -> list[str]:
    """Add ``defs`` to ``mcp``; return the tool names in order."""
    names = []
    for d in defs:
        if d.op is not None:
            description = describe(d.op, d.fn.__doc__, target_argument(d.fn))
            hints = tool_annotations(d.op)
        else:
            description = d.description or _first_paragraph(d.fn.__doc__)
            hints = ToolAnnotations(
                read_only_hint=True,
                destructive_hint=False,
                idempotent_hint=True,
                open_world_hint=False,
            )
        mcp.tool(
            d.fn,
            name=d.tool_name,
            description=description,
            annotations=hints,
            tags={d.group},
        )
        names.append(d.tool_name)
    return names
