"""``qubes-mcp serve`` as a real subprocess, spoken to over MCP by FastMCP's client.

The stdio test runs the exact command of the emulator snippet in docs/mcp-clients.md, so the
documented configuration is the tested one. The HTTP test checks the documented URL.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport, StreamableHttpTransport
from fastmcp.exceptions import ToolError

from qubes_mcp.stack import Stack, start_stack

pytestmark = pytest.mark.bwrap

DOC = Path(__file__).resolve().parents[2] / "docs" / "mcp-clients.md"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stdio") / "root")
    try:
        yield s
    finally:
        s.stop()


def documented_sim_command(root: Path) -> tuple[str, list[str]]:
    """The command and args of the ``sim-stdio`` snippet, with ROOT filled in."""
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- snippet: sim-stdio[^>]*-->\s*```json\n(.*?)```", text, re.S)
    assert block is not None, "the sim-stdio snippet is missing from docs/mcp-clients.md"
    server = json.loads(block.group(1))["mcpServers"]["qubes-sim"]
    args = [str(root) if a == "ROOT" else a for a in server["args"]]
    return str(BIN / server["command"]), args


def test_the_documented_stdio_command_serves_the_tools(stack: Stack) -> None:
    command, args = documented_sim_command(stack.root)

    async def go() -> tuple[set[str], dict[str, object], str]:
        async with Client(StdioTransport(command, args)) as client:
            names = {t.name for t in await client.list_tools()}
            listed = (await client.call_tool("qube_list", {})).structured_content or {}
            with pytest.raises(ToolError) as info:
                await client.call_tool("qube_info", {"qube": "vault"})
            return names, listed, str(info.value)

    names, listed, refused = asyncio.run(go())
    assert {"qube_list", "qube_run", "qube_remove", "capabilities_get"} <= names
    assert listed["principal"] == "mcp-control"
    assert refused == "not-found: no such qube, or not yours"


def test_stdio_read_only_offers_only_read_tools(stack: Stack) -> None:
    command, args = documented_sim_command(stack.root)

    async def go() -> list[object]:
        async with Client(StdioTransport(command, [*args, "--read-only"])) as client:
            return [t.annotations.read_only_hint for t in await client.list_tools()]  # type: ignore[union-attr]

    hints = asyncio.run(go())
    assert hints and all(hints)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve --transport http exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("HTTP server did not start listening")


def test_http_transport_on_loopback(stack: Stack, tmp_path: Path) -> None:
    port = _free_port()
    argv = [str(BIN / "qubes-mcp"), "serve", "--sim", str(stack.root), "--transport", "http"]
    log = (tmp_path / "http.log").open("wb")
    proc = subprocess.Popen([*argv, "--port", str(port)], stdout=log, stderr=log)
    try:
        _wait_for_port(port, proc)

        async def go() -> dict[str, object]:
            url = f"http://127.0.0.1:{port}/mcp"
            async with Client(StreamableHttpTransport(url)) as client:
                return (await client.call_tool("budget_get", {})).structured_content or {}

        assert asyncio.run(go())["max_qubes"] == 32
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_http_refuses_a_non_loopback_host() -> None:
    result = subprocess.run(
        [str(BIN / "qubes-mcp"), "serve", "--transport", "http", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "loopback only" in result.stderr
