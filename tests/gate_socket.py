"""Clients of the gate socket that speak exactly what qrexec writes to a socket service.

qrexec connects, writes ``qmcp.Op+ SOURCE keyword adminvm|name TARGET\\0``, then the caller's
input, then half-closes (EOF), and reads the reply to the end. These helpers do the same with
plain sockets, and also the misbehaving variants a flood is made of.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


def descriptor(service: str, source: str, target: str | None = None) -> bytes:
    where = "keyword adminvm" if target is None else f"name {target}"
    return f"{service}+ {source} {where}\0".encode()


def connect(path: Path, data: bytes = b"", *, timeout: float = 30) -> socket.socket:
    """A connection that has sent ``data`` and nothing else: no EOF (it holds its place)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))  # blocking, as qrexec does: waits while the backlog is full
    sock.settimeout(timeout)
    if data:
        sock.sendall(data)
    return sock


def read_reply(sock: socket.socket) -> dict[str, Any] | None:
    """The reply to the end (None when the gate closed without one)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    if not data:
        return None
    reply: dict[str, Any] = json.loads(data)
    return reply


def request(
    path: Path,
    service: str,
    source: str,
    target: str | None = None,
    payload: bytes = b"",
    *,
    timeout: float = 30,
) -> tuple[dict[str, Any] | None, float]:
    """One whole request as qrexec makes it; the reply and how long it took."""
    start = time.monotonic()
    with connect(path, descriptor(service, source, target) + payload, timeout=timeout) as sock:
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock)
    return reply, time.monotonic() - start
