"""``qubes-mcp sim``: run an emulated dom0, and make qrexec calls as one of its qubes.

Contracts (kept stable; tests and tools rely on them):

- ``qubes-mcp sim run --root DIR [--fleet FILE]``: foreground; ``DIR/run/qubesd.sock`` is the
  Admin API socket; ``DIR/run/emulator.ready`` appears once it serves.
- ``qubes-mcp sim call --root DIR --from SOURCE TARGET SERVICE[+ARG]``: what
  ``qrexec-client-vm`` does inside SOURCE: payload on stdin, reply on stdout, exit 126 and
  ``Request refused`` on stderr when the policy denies.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from qubes_mcp.sim.emulator import main_run
    from qubes_mcp.sim.fleet import FleetError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return main_run(Path(args.root), Path(args.fleet) if args.fleet else None)
    except (FleetError, UnicodeDecodeError) as exc:  # one clear line, not a traceback
        print(f"qubes-mcp sim run: fleet {args.fleet or '(demo)'}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"qubes-mcp sim run: {exc}", file=sys.stderr)
        return 2


def _call(args: argparse.Namespace) -> int:
    from qubes_mcp.sim.qrexec.client import sim_call_main

    return sim_call_main(Path(args.root), args.source, args.target, args.service)


def add_parser(sub: Any) -> None:
    """Register ``sim`` and its subcommands on the top-level ``qubes-mcp`` parser."""
    sim = sub.add_parser(
        "sim",
        help="the Qubes dom0 emulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim_sub = sim.add_subparsers(dest="sim_command", required=True)

    run = sim_sub.add_parser("run", help="run an emulated dom0 in the foreground")
    run.add_argument("--root", required=True, help="emulator root directory (created if absent)")
    run.add_argument("--fleet", help="fleet file (TOML) for a fresh root; default: demo fleet")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_run)

    call = sim_sub.add_parser("call", help="make a qrexec call as one of the emulated qubes")
    call.add_argument("--root", required=True, help="root of a running emulator")
    call.add_argument("--from", dest="source", required=True, help="calling qube")
    call.add_argument("target", help="target qube, @adminvm, @dispvm, @dispvm:NAME, @default")
    call.add_argument("service", help="SERVICE[+ARG]")
    call.set_defaults(func=_call)
