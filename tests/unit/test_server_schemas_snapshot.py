"""The tool list an agent sees (names, descriptions, argument and output schemas, annotations)
is pinned: any change shows up as a diff of tests/server/snapshots/tools.json in review.

Regenerate deliberately with ``QMCP_UPDATE_SNAPSHOTS=1`` set while running this file; a missing
snapshot fails too (it is never written silently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastmcp import FastMCP

from tests.server.helpers import list_tools, offline_server

SNAPSHOTS = Path(__file__).resolve().parents[1] / "server" / "snapshots"


def tool_listing(mcp: FastMCP) -> list[dict[str, Any]]:
    return [
        t.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"meta"})
        for t in list_tools(mcp)
    ]


def check_snapshot(name: str, data: object) -> None:
    path = SNAPSHOTS / name
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if os.environ.get("QMCP_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing: run with QMCP_UPDATE_SNAPSHOTS=1 to create it"
    assert path.read_text(encoding="utf-8") == text, (
        f"the tool list changed; review and regenerate {path} with QMCP_UPDATE_SNAPSHOTS=1"
    )


def test_full_tool_list_matches_the_snapshot() -> None:
    check_snapshot("tools.json", tool_listing(offline_server()))


def test_read_only_tool_list_matches_the_snapshot() -> None:
    check_snapshot("tools-read-only.json", tool_listing(offline_server(read_only=True)))
