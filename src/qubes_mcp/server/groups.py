"""Tool groups for ``--tools``/``--disable`` (no FastMCP import: the CLI parser needs them)."""

from __future__ import annotations

#: in documentation order
GROUPS: tuple[str, ...] = (
    "read",
    "power",
    "exec",
    "files",
    "network",
    "create",
    "config",
    "devices",
    "remove",
    "plan",
)
