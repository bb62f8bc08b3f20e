"""``qubes-mcp serve``: the MCP server in the control qube (or against the emulator).

- ``qubes-mcp serve``: stdio, calls dom0 with ``qrexec-client-vm`` (inside a Qubes qube).
- ``qubes-mcp serve --sim ROOT [--principal mcp-control]``: the same calls through a running
  emulator's qrexec router, as the principal's qube.
- ``--transport http [--host 127.0.0.1] [--port 8765]``: streamable HTTP on a loopback address
  only (anything that can reach the port can drive the agent's authority).
- ``--read-only``, ``--tools GROUP,...``, ``--disable GROUP,...``: trim the tools offered.
- ``--check``: make one harmless call to dom0 (``qmcp.List``) through that transport, say
  exactly what is wrong (or OK, with the size of the principal's scope) and exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from qubes_mcp.server.groups import GROUPS


class NotLoopbackError(ValueError):
    """``--host`` is not a loopback address."""


def check_loopback(host: str) -> str:
    """``host`` if it is ``localhost`` or a loopback IP address.

    Raises:
        NotLoopbackError: anything else (a LAN address, ``0.0.0.0``, a DNS name).
    """
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise NotLoopbackError(f"refusing to listen on {host!r}: HTTP binds to loopback only")


def _groups(text: str | None) -> list[str] | None:
    return None if text is None else [g.strip() for g in text.split(",") if g.strip()]


def http_options() -> dict[str, Any]:
    """How the HTTP transport is run: loopback Host/Origin only (403 otherwise, http_guard.py,
    in place of FastMCP's looser guard) and no per-request access-log line."""
    from starlette.middleware import Middleware

    from qubes_mcp.server.http_guard import LoopbackOnly

    return {
        "middleware": [Middleware(LoopbackOnly)],
        "host_origin_protection": False,  # it would answer first, and looser (see http_guard)
        "uvicorn_config": {"access_log": False},
    }


def _check(transport: Any) -> int:
    import asyncio

    from qubes_mcp.server.check import check

    result = asyncio.run(check(transport))
    print(
        f"qubes-mcp serve --check: {result.message}", file=sys.stdout if result.ok else sys.stderr
    )
    return 0 if result.ok else 1


def _serve(args: argparse.Namespace) -> int:
    from qubes_mcp.server.app import UnknownGroupError, build_server, select_groups
    from qubes_mcp.server.transport import Prober, QrexecTransport, SimTransport, Timeouts

    try:
        groups = select_groups(_groups(args.tools), _groups(args.disable) or ())
        host = check_loopback(args.host)
    except (UnknownGroupError, NotLoopbackError) as exc:
        print(f"qubes-mcp serve: {exc}", file=sys.stderr)
        return 2
    transport: Prober
    if args.sim:
        transport = SimTransport(Path(args.sim), args.principal)
    else:
        transport = QrexecTransport(args.qrexec_client)
    if args.check:
        return _check(transport)
    mcp = build_server(
        transport,
        groups=groups,
        read_only=args.read_only,
        timeouts=Timeouts(consent=float(args.consent_timeout)),
    )
    if args.transport == "http":
        mcp.run(transport="http", host=host, port=args.port, show_banner=False, **http_options())
    else:
        mcp.run(transport="stdio", show_banner=False)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``serve`` on the top-level ``qubes-mcp`` parser."""
    from qubes_mcp.server.transport import QREXEC_CLIENT_VM

    serve = sub.add_parser(
        "serve",
        help="the MCP server (control qube)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--sim", metavar="ROOT", help="use a running emulator at ROOT")
    serve.add_argument(
        "--principal",
        default="mcp-control",
        help="the calling qube with --sim (default: %(default)s)",
    )
    serve.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address (loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default: %(default)s)")
    serve.add_argument(
        "--check",
        action="store_true",
        help="make one harmless call to dom0, say what is wrong (or OK) and exit",
    )
    serve.add_argument("--read-only", action="store_true", help="offer only read tools")
    serve.add_argument("--tools", metavar="GROUP,...", help=f"offer only: {','.join(GROUPS)}")
    serve.add_argument("--disable", metavar="GROUP,...", help="do not offer these groups")
    serve.add_argument(
        "--qrexec-client", default=QREXEC_CLIENT_VM, help="qrexec-client-vm (default: %(default)s)"
    )
    serve.add_argument(
        "--consent-timeout",
        type=int,
        default=120,
        help="the gate's [consent] timeout in seconds, so calls wait long enough (default 120)",
    )
    serve.set_defaults(func=_serve)
