"""The MCP tools match the gate's operations table exactly (the table is the source of truth).

Every operation has exactly one tool and every tool one operation (apart from the documented
extras); annotations are the table's; every argument's name and constraints are the table's
field's; descriptions state the tier and what a not-found refusal means. ``operations.json``,
the server's copy of the table, is regenerated from ``qubes_mcp.dom0.operations``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp.types import Tool

from qubes_mcp.dom0.errors import CODES
from qubes_mcp.dom0.operations import OPERATIONS, Field, Operation, Target
from qubes_mcp.server.params import QUBE_NAME_PATTERN
from qubes_mcp.server.registry import EXTRA_TOOLS, tool_name
from qubes_mcp.server.table import load_table
from tests.server.helpers import list_tools, offline_server

ROOT = Path(__file__).resolve().parents[2]


def _gen_operations() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_operations", ROOT / "tools/gen_operations.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_operations"] = module
    spec.loader.exec_module(module)
    return module


TOOLS: dict[str, Tool] = {t.name: t for t in list_tools(offline_server())}
OPS = {tool_name(op.name): op for op in OPERATIONS}


def test_operations_json_is_regenerated_from_the_gate_table() -> None:
    gen = _gen_operations()
    assert gen.OUT.read_text(encoding="utf-8") == gen.render(), (
        "src/qubes_mcp/server/operations.json is stale: run python tools/gen_operations.py"
    )


def test_the_servers_copy_of_the_table_has_every_operation_and_code() -> None:
    table = load_table()
    assert [op.name for op in table.operations] == [op.name for op in OPERATIONS]
    assert table.codes == CODES
    assert (table.not_found_code, table.not_found_message) == (
        "not-found",
        "no such qube, or not yours",
    )


def test_every_operation_has_exactly_one_tool_and_vice_versa() -> None:
    assert sorted(TOOLS) == sorted([*OPS, *EXTRA_TOOLS])


@pytest.mark.parametrize("name", sorted(OPS))
def test_annotations_are_the_tables(name: str) -> None:
    op, hints = OPS[name], TOOLS[name].annotations
    assert hints is not None
    assert hints.read_only_hint is op.read_only
    assert hints.destructive_hint is op.destructive
    assert hints.idempotent_hint is op.idempotent
    assert hints.open_world_hint is op.open_world


def test_only_the_tools_that_run_commands_reach_the_open_world() -> None:
    # a command runs in a qube that may be networked (through the egress), and a template's
    # update fetches from mirrors through its scope's egress: the network is outside the
    # machine. Nothing else an agent can ask reaches beyond the machine's qubes.
    open_world = {
        name for name, t in TOOLS.items() if t.annotations and t.annotations.open_world_hint
    }
    assert open_world == {"qube_run", "disposable_run", "template_update"}


def test_a_creator_tier_is_stated_on_the_target() -> None:
    for name, op in OPS.items():
        tier = (TOOLS[name].description or "").splitlines()[-1]
        if op.creator_needs is None:
            assert "if you created it" not in tier, name
        else:
            assert f"; {op.creator_needs.word} if you created it" in tier, name


def test_extra_tools_are_honestly_read_only() -> None:
    for name in EXTRA_TOOLS:
        hints = TOOLS[name].annotations
        assert hints is not None and hints.read_only_hint is True
        assert hints.destructive_hint is False and hints.open_world_hint is False


@pytest.mark.parametrize("name", sorted(OPS))
def test_description_states_the_tier_on_the_arguments_the_tool_takes(name: str) -> None:
    op, tool = OPS[name], TOOLS[name]
    text = tool.description or ""
    tier = text.splitlines()[-1]
    assert tier.startswith("Tier: ")
    args = set(tool.input_schema["properties"])
    if op.target is Target.QUBE:
        assert f"{op.needs.word} on " in tier
        named = tier.removeprefix("Tier: ").split(",")[0].split(" on ")[1].split(";")[0].strip(".")
        assert named in args, (named, args)
    for ref in op.refs:
        assert f"{ref.needs.word} on {ref.field}" in tier
    assert ("waits for the operator's approval" in tier) is op.consent


def test_the_rules_every_tool_shares_are_stated_once_in_the_instructions() -> None:
    from qubes_mcp.server.app import INSTRUCTIONS

    text = " ".join(INSTRUCTIONS.split())
    assert "not-found: no such qube, or not yours" in text
    assert "read < exec < net < full" in text
    assert "<code>: <message>" in text
    assert "waits for the operator's approval" in text
    for tool in TOOLS.values():  # ... and not repeated per tool
        assert "not yours" not in (tool.description or "")


def _variants(prop: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The non-null schema of a property, and whether null is allowed."""
    if "anyOf" in prop:
        non_null = [s for s in prop["anyOf"] if s.get("type") != "null"]
        assert len(non_null) == 1
        return non_null[0], len(non_null) < len(prop["anyOf"])
    return prop, False


def _pattern(table_pattern: str) -> str:
    # the gate uses Python's \A…\Z; JSON Schema (and pydantic's engine) spell them ^…$
    return "^" + table_pattern.removeprefix(r"\A").removesuffix(r"\Z") + "$"


def _check_field(f: Field, prop: dict[str, Any], required: bool) -> None:
    schema, nullable = _variants(prop)
    assert nullable is f.nullable, f.name
    assert required is (f.required and "default" not in prop), f.name
    if not f.required:
        assert prop.get("default") == f.default, f.name
    if f.kind == "new_name":  # a name the agent invents: qubesd's naming rule, client-side too
        assert schema["pattern"] == QUBE_NAME_PATTERN and schema["maxLength"] == 31
    elif f.kind == "qube":  # an existing qube (from qube_list): the gate checks the name
        assert schema["type"] == "string"
    elif f.kind == "base64":
        assert schema["type"] == "string" and schema["maxLength"] == f.max_len
    elif f.kind in ("str", "text"):
        assert schema["type"] == "string" and schema["maxLength"] == f.max_len
        assert schema.get("pattern", "") == (_pattern(f.pattern) if f.pattern else "")
    elif f.kind == "int":
        assert schema["type"] == "integer"
        assert (schema["minimum"], schema["maximum"]) == (f.minimum, f.maximum)
    elif f.kind == "bool":
        assert schema["type"] == "boolean"
    elif f.kind == "choice":
        assert schema["enum"] == list(f.choices)
    elif f.kind == "argv":
        assert schema["type"] == "array" and schema["minItems"] == 1
        assert schema["maxItems"] == f.maximum
        assert schema["items"] == {"type": "string", "maxLength": f.max_len}
    elif f.kind == "rules":
        assert schema["type"] == "array" and schema["maxItems"] == f.maximum
        assert schema["items"]["required"] == ["action"]
        assert schema["items"]["additionalProperties"] is False
    elif f.kind == "steps":
        assert schema["type"] == "array" and schema["maxItems"] == f.maximum
        assert schema["minItems"] == 1
    else:
        raise AssertionError(f"unhandled field kind {f.kind}")


@pytest.mark.parametrize("name", sorted(OPS))
def test_arguments_are_the_tables_fields_plus_the_target(name: str) -> None:
    op: Operation = OPS[name]
    schema = TOOLS[name].input_schema
    props: dict[str, Any] = schema["properties"]
    required = set(schema.get("required", []))
    assert schema.get("additionalProperties") is False
    extra = set(props) - {f.name for f in op.fields}
    if op.target is Target.QUBE:
        # the qube the call is about (its qrexec target) is one more, required, qube name
        assert len(extra) == 1, extra
        (target,) = extra
        assert target in required
        assert props[target]["type"] == "string"
    else:
        assert extra == set()
    for f in op.fields:
        _check_field(f, props[f.name], f.name in required)


def test_every_tool_has_a_structured_output_schema() -> None:
    for name, tool in TOOLS.items():
        assert tool.output_schema is not None, name
        assert tool.output_schema.get("type") == "object", name
