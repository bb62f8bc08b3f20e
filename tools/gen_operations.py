"""Render the gate's operations table into the data file the MCP server reads.

The MCP server runs in the untrusted control qube and may not import ``qubes_mcp.dom0``
(``tools/check_imports.py``), yet its tools must match the table exactly. So the table is
rendered here, once, into ``src/qubes_mcp/server/operations.json``; a test fails when that file
is stale. Usage: ``python tools/gen_operations.py`` (writes) or ``--check`` (exit 1 if stale).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "qubes_mcp" / "server" / "operations.json"


def _field(f: Any) -> dict[str, Any]:
    return {
        "name": f.name,
        "kind": f.kind,
        "doc": f.doc,
        "required": f.required,
        "default": f.default,
        "choices": list(f.choices),
        "minimum": f.minimum,
        "maximum": f.maximum,
        "max_len": f.max_len,
        "pattern": f.pattern,
        "nullable": f.nullable,
    }


def render() -> str:
    """The JSON text of the table (stable key order, trailing newline)."""
    sys.path.insert(0, str(ROOT / "src"))
    from qubes_mcp.dom0.errors import CODES, NotFoundError
    from qubes_mcp.dom0.operations import OPERATIONS

    data = {
        "generated_by": "tools/gen_operations.py from qubes_mcp.dom0.operations; do not edit",
        "codes": list(CODES),
        "not_found": {"code": NotFoundError.code, "message": NotFoundError.default_message},
        "operations": [
            {
                "name": op.name,
                "service": op.service,
                "summary": op.summary,
                "target": op.target.value,
                "needs": op.needs.word,
                "consent": op.consent,
                "read_only": op.read_only,
                "destructive": op.destructive,
                "idempotent": op.idempotent,
                "creates": op.creates,
                "long_running": op.long_running,
                "creator_needs": op.creator_needs.word if op.creator_needs else None,
                "open_world": op.open_world,
                "fields": [_field(f) for f in op.fields],
                "refs": [
                    {"field": r.field, "needs": r.needs.word, "allow_dump": r.allow_dump}
                    for r in op.refs
                ],
            }
            for op in OPERATIONS
        ],
    }
    return json.dumps(data, indent=1, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python tools/gen_operations.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
