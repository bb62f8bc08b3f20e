"""Shared helpers for the MCP server tests: listing a server's tools through the protocol."""

from __future__ import annotations

import asyncio
from typing import Any

from fastmcp import Client, FastMCP
from mcp.types import Tool

from qubes_mcp.server.app import build_server
from qubes_mcp.server.transport import QrexecTransport


def offline_server(**kwargs: Any) -> FastMCP:
    """A server whose transport can never reach dom0 (for listing tools)."""
    return build_server(QrexecTransport("/nonexistent/qrexec-client-vm"), **kwargs)


def list_tools(mcp: FastMCP) -> list[Tool]:
    async def go() -> list[Tool]:
        async with Client(mcp) as client:
            return await client.list_tools()

    return asyncio.run(go())
