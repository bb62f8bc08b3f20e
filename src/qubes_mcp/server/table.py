"""The operations table as the MCP server sees it: read from the generated ``operations.json``.

The server may not import ``qubes_mcp.dom0`` (it runs in the untrusted control qube and holds
no authority), so it learns the table from data rendered by ``tools/gen_operations.py``. Nothing
here decides anything: tiers and consent flags only shape tool descriptions and timeouts; dom0
decides every call again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

#: the qrexec target of calls about no particular qube
ADMINVM = "@adminvm"


@dataclass(frozen=True)
class FieldSpec:
    """One key of an operation's JSON payload (mirror of the gate's ``Field``)."""

    name: str
    kind: str
    doc: str
    required: bool
    default: Any
    choices: tuple[str, ...]
    minimum: int
    maximum: int
    max_len: int
    pattern: str
    nullable: bool


@dataclass(frozen=True)
class RefSpec:
    """Another qube an operation touches, and the tier it needs there."""

    field: str
    needs: str
    allow_dump: bool


@dataclass(frozen=True)
class OpSpec:
    """One ``qmcp.*`` operation (mirror of the gate's ``Operation``)."""

    name: str
    service: str
    summary: str
    target: str  #: ``@adminvm`` or ``qube`` (the call is addressed to the qube it is about)
    needs: str
    consent: bool
    read_only: bool
    destructive: bool
    idempotent: bool
    creates: bool
    long_running: bool
    fields: tuple[FieldSpec, ...]
    refs: tuple[RefSpec, ...] = ()
    #: what it needs on a target the principal created itself (``None``: ``needs`` always)
    creator_needs: str | None = None
    #: what it runs can reach the network outside the machine (the MCP ``openWorldHint``)
    open_world: bool = False

    @property
    def is_global(self) -> bool:
        return self.target == ADMINVM

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True)
class Table:
    operations: tuple[OpSpec, ...]
    codes: tuple[str, ...]
    not_found_code: str
    not_found_message: str

    def op(self, name: str) -> OpSpec:
        for op in self.operations:
            if op.name == name:
                return op
        raise KeyError(name)


def _op(raw: dict[str, Any]) -> OpSpec:
    fields = tuple(FieldSpec(**{**f, "choices": tuple(f["choices"])}) for f in raw["fields"])
    return OpSpec(
        name=raw["name"],
        service=raw["service"],
        summary=raw["summary"],
        target=raw["target"],
        needs=raw["needs"],
        consent=raw["consent"],
        read_only=raw["read_only"],
        destructive=raw["destructive"],
        idempotent=raw["idempotent"],
        creates=raw["creates"],
        long_running=raw["long_running"],
        fields=fields,
        refs=tuple(RefSpec(**r) for r in raw["refs"]),
        creator_needs=raw["creator_needs"],
        open_world=raw["open_world"],
    )


def parse_table(text: str) -> Table:
    """Build a :class:`Table` from the generated JSON text."""
    raw = json.loads(text)
    return Table(
        operations=tuple(_op(op) for op in raw["operations"]),
        codes=tuple(raw["codes"]),
        not_found_code=raw["not_found"]["code"],
        not_found_message=raw["not_found"]["message"],
    )


@cache
def load_table() -> Table:
    """The table shipped with this package (``operations.json`` next to this module)."""
    text = resources.files("qubes_mcp.server").joinpath("operations.json").read_text("utf-8")
    return parse_table(text)
