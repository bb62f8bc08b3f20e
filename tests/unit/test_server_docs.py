"""docs/tools.md is generated from the live tool list and must be up to date."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tools_doc_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_tools_doc", ROOT / "tools/gen_tools_doc.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_tools_doc"] = gen
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text(encoding="utf-8") == gen.render(), (
        "docs/tools.md is stale: run python tools/gen_tools_doc.py"
    )


def test_tools_doc_lists_every_tool_with_its_tier() -> None:
    text = (ROOT / "docs/tools.md").read_text(encoding="utf-8")
    assert "| [`qube_remove`](#qube_remove) | full | remove |" in text
    assert "| [`firewall_set`](#firewall_set) | net | network |" in text
