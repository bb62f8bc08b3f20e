"""``qubes-mcp``: the MCP server (``serve``), the emulator (``sim``) and the ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qubes_mcp import __version__


def build_parser() -> argparse.ArgumentParser:
    import qubes_mcp.server.cli as server_cli
    import qubes_mcp.sim.cli as sim_cli
    from qubes_mcp import demo

    parser = argparse.ArgumentParser(
        prog="qubes-mcp",
        description="Let AI agents operate Qubes OS through MCP, bounded in dom0: the MCP server, "
        "the dom0 emulator, and a demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    server_cli.add_parser(sub)
    sim_cli.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
