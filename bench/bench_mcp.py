"""The MCP server (issue 4): what one read tool call costs end to end, next to the same gate
call made without MCP.

``qube_list`` / ``qmcp.List`` on the demo fleet, side by side:

- ``mcp.stdio``: an MCP client speaking to a ``qubes-mcp serve --sim ROOT`` subprocess over
  stdio (JSON-RPC) → the server → the emulated qrexec router as ``mcp-control`` → the gate →
  its reply, decoded into the tool's structured result: what an agent waits for;
- ``mcp.memory``: the same server in process (FastMCP's in-memory client): the server's own
  cost without the stdio pipe;
- ``mcp.router``: the server's transport call alone (``SimTransport``: the router, the gate);
- ``mcp.sim-call``: ``qubes-mcp sim call --from mcp-control @adminvm qmcp.List`` per call,
  the documented command-line way (a fresh Python process each time).

Standalone: ``.venv/bin/python -m bench.bench_mcp [--quick]``; also part of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

from fastmcp import Client
from fastmcp.client.transports import StdioTransport

from bench import stacks
from bench.common import REPO, Budget, Result, measure, measure_async
from qubes_mcp.server.app import build_server
from qubes_mcp.server.table import load_table
from qubes_mcp.server.transport import SimTransport, Timeouts, invoke
from qubes_mcp.stack import PRINCIPAL

FAST = Budget(count=300, seconds=6.0, warmup=5)
SLOW = Budget(count=30, seconds=8.0, warmup=1)


def _ratio(base: Result, other: Result) -> str:
    if base.p50 is None or other.p50 is None:
        return ""
    return f"p50 ×{other.p50 / base.p50:.2f} the router call"


async def _mcp_rows(root: Path, budget: Budget) -> tuple[Result, Result, Result]:
    op = load_table().op("qube.list")
    transport = SimTransport(root, PRINCIPAL)

    async def router() -> object:
        return await invoke(transport, op, "@adminvm", {}, Timeouts())

    router_row = Result.from_sample(
        "mcp.router",
        "qmcp.List via the server's SimTransport (router → gate)",
        await measure_async(router, budget),
    )
    async with Client(build_server(transport)) as client:

        async def memory() -> object:
            return (await client.call_tool("qube_list", {})).structured_content

        memory_row = Result.from_sample(
            "mcp.memory",
            "qube_list, in-memory MCP client → server → router → gate",
            await measure_async(memory, budget),
        )
    exe = str(Path(sys.executable).parent / "qubes-mcp")
    stdio = StdioTransport(exe, ["serve", "--sim", str(root), "--principal", PRINCIPAL])
    async with Client(stdio) as client:

        async def over_stdio() -> object:
            return (await client.call_tool("qube_list", {})).structured_content

        stdio_row = Result.from_sample(
            "mcp.stdio",
            "qube_list, MCP client → `qubes-mcp serve --sim` (stdio) → router → gate",
            await measure_async(over_stdio, budget),
        )
    memory_row.notes = _ratio(router_row, memory_row)
    stdio_row.notes = _ratio(router_row, stdio_row)
    return stdio_row, memory_row, router_row


def _sim_call_row(root: Path, budget: Budget) -> Result:
    argv = [sys.executable, "-m", "qubes_mcp.cli", "sim", "call", "--root", str(root)]
    argv += ["--from", PRINCIPAL, "@adminvm", "qmcp.List"]

    def one() -> object:
        done = subprocess.run(
            argv, input=b"", capture_output=True, cwd=REPO, timeout=60, check=False
        )
        if done.returncode != 0 or not done.stdout.startswith(b'{"ok":true'):
            raise RuntimeError(f"sim call failed: {done.returncode} {done.stderr[-300:]!r}")
        return done

    return Result.from_sample(
        "mcp.sim-call",
        "`qubes-mcp sim call … @adminvm qmcp.List` (fresh process per call)",
        measure(one, budget),
        notes="the same gate call without MCP",
    )


def run(quick: bool) -> list[Result]:
    s = stacks.stack(stacks.DEMO)
    rows = list(asyncio.run(_mcp_rows(s.root, FAST.scaled(quick))))
    rows.append(_sim_call_row(s.root, SLOW.scaled(quick)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from bench.__main__ import table

    try:
        print(table(run(args.quick)))
    finally:
        stacks.close_all()


if __name__ == "__main__":
    main()
