"""Only loopback may drive the HTTP transport: exact Host and Origin, or HTTP 403.

The control qube's browser can be made to send requests to ``127.0.0.1`` by any web page
(DNS rebinding: ``evil.example`` resolves to 127.0.0.1, and the browser sends
``Host: evil.example:8765`` and ``Origin: http://evil.example``). Binding to loopback does not
stop that; checking the headers does, and the MCP transport specification requires servers
to validate ``Origin``.

A request is served only if its ``Host`` is ``127.0.0.1``, ``localhost`` or ``[::1]`` *with the
port the server listens on*, and its ``Origin``, when present, is ``http://`` one of those with
the same port. Everything else gets ``403 Forbidden`` before it reaches MCP.

Why not FastMCP's own guard (``host_origin_protection``): it answers a foreign Host with 421,
and for a loopback Host it accepts a loopback Origin on *any* port — so a page served by any
other local web server in the control qube could drive the agent's tools. This guard is exact
and replaces it (FastMCP's would sit in front of any middleware we add and answer first).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "[::1]")
_FORBIDDEN: Final = b"Forbidden: only loopback Host and Origin may use this server\n"


def loopback_hosts(port: int) -> frozenset[str]:
    """Every ``Host`` header value the server on ``port`` answers."""
    return frozenset(f"{name}:{port}" for name in LOOPBACK_NAMES)


def loopback_origins(port: int) -> frozenset[str]:
    """Every ``Origin`` the server on ``port`` answers (an absent Origin is fine too)."""
    return frozenset(f"http://{name}:{port}" for name in LOOPBACK_NAMES)


def allowed(host: str | None, origin: str | None, port: int) -> bool:
    """The whole rule, pure: exact loopback Host with our port; no Origin or the same kind."""
    if host is None or host.lower() not in loopback_hosts(port):
        return False
    return origin is None or origin.lower() in loopback_origins(port)


class LoopbackOnly:
    """ASGI middleware applying :func:`allowed` to every HTTP and WebSocket request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(bytes(key).lower(), []).append(bytes(value))
        server = scope.get("server") or ("", 0)
        if _one(headers, b"host", b"origin") and allowed(
            _text(headers.get(b"host")), _text(headers.get(b"origin")), int(server[1] or 0)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(_FORBIDDEN)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _FORBIDDEN})


def _one(headers: dict[bytes, list[bytes]], *names: bytes) -> bool:
    """A repeated Host or Origin header is ambiguous: refuse rather than pick one."""
    return all(len(headers.get(name, ())) <= 1 for name in names)


def _text(values: list[bytes] | None) -> str | None:
    if not values:
        return None
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        return "\ufffd"  # matches nothing we allow
