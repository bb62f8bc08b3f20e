"""The qubesd sockets: R4.3 framing over asyncio Unix stream servers.

One request per connection. The server reads until EOF (at most 65536 bytes, else the
connection is aborted), splits at the first NUL, parses ``method[+arg] src type dest``
(exactly four space-separated fields; ``keyword adminvm`` means dom0, any other type is a
framing error) and answers ``0\\0<text>`` or ``2\\0<Class>\\0\\0<message>\\0`` for a
``QubesException``. Every other failure (protocol error, permission denied, a bug) is logged
and the connection aborted with zero bytes, exactly as R4.3 ``QubesDaemonProtocol`` does.
The source field is trusted: only dom0 tools and the qrexec router reach these sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.paths import SimPaths

# handler modules register their methods on import
from qubes_mcp.sim.qubesd import (  # noqa: F401
    api_devices,
    api_events,
    api_extra,
    api_pools,
    api_props,
    api_stats,
    api_storage,
    api_vm,
)
from qubes_mcp.sim.qubesd.api import Call
from qubes_mcp.sim.qubesd.app import QubesApp, Request
from qubes_mcp.sim.qubesd.events import wire_value
from qubes_mcp.sim.qubesd.vm import Qube

log = logging.getLogger("qubes_mcp.sim.qubesd")

BUFFER_SIZE = 65536
_HEADER = struct.Struct("Bx")


class QubesdProtocol(asyncio.Protocol):
    """One connection of one socket (``api`` is ``admin`` or ``internal``)."""

    def __init__(self, app: QubesApp, api: str, tasks: set[asyncio.Task[None]]) -> None:
        self.app = app
        self.api = api
        self.tasks = tasks
        self.untrusted_buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.event_sent = False
        self.call: Call | None = None
        self.task: asyncio.Task[None] | None = None
        self.aborted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc_: Exception | None) -> None:
        self.transport = None
        if self.task is not None and self.call is not None and self.call.cancellable:
            self.task.cancel()

    def data_received(self, untrusted_data: bytes) -> None:
        if self.aborted:
            return
        if len(self.untrusted_buffer) + len(untrusted_data) > BUFFER_SIZE:
            log.warning("request too long")
            self._abort()
            return
        self.untrusted_buffer += untrusted_data

    def eof_received(self) -> bool | None:
        if self.aborted:
            return None
        try:
            header, untrusted_payload = bytes(self.untrusted_buffer).split(b"\0", 1)
            meth_arg, src, dest_type, dest = header.split(b" ", 3)
            if dest_type == b"keyword" and dest == b"adminvm":
                dest_type, dest = b"name", b"dom0"
            if dest_type != b"name":
                raise ValueError("only explicit name destinations are supported")
            meth, _, arg = meth_arg.partition(b"+")
        except ValueError:
            log.warning("framing error")
            self._abort()
            return None
        finally:
            self.untrusted_buffer = bytearray()
        self.task = asyncio.ensure_future(
            self.respond(src, meth, dest, arg, untrusted_payload=untrusted_payload)
        )
        self.tasks.add(self.task)
        self.task.add_done_callback(self.tasks.discard)
        return True

    def _abort(self) -> None:
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()

    async def respond(
        self, src: bytes, meth: bytes, dest: bytes, arg: bytes, *, untrusted_payload: bytes
    ) -> None:
        where = f"{meth!r}+{arg!r} ({src!r} -> {dest!r}), payload of {len(untrusted_payload)} bytes"
        try:
            self.call = Call.build(
                self.app,
                self.api,
                src=src,
                method_name=meth,
                dest=dest,
                arg=arg,
                send_event=self.send_event,
            )
            self.app.record.append(
                Request(
                    self.call.method,
                    self.call.arg,
                    self.call.src.name,
                    self.call.dest.name,
                    untrusted_payload,
                )
            )
            response = await self.call.execute(untrusted_payload)
        except exc.PermissionDenied:
            log.warning("permission denied for call %s", where)
        except exc.ProtocolError:
            log.warning("protocol error for call %s", where)
        except exc.QubesException as err:
            log.info("%s: %s while calling %s", type(err).__name__, err, where)
            if self.transport is not None:
                self.send_exception(err)
                self.transport.write_eof()
                self.transport.close()
            return
        except Exception:
            log.exception("unhandled exception while calling %s", where)
        else:
            if self.transport is not None:
                if not self.event_sent:
                    self.write(0x30, b"" if response is None else response.encode("utf-8"))
                self.transport.write_eof()
                self.transport.close()
            return
        self._abort()

    def write(self, kind: int, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(_HEADER.pack(kind) + data)

    def send_event(self, subject: Any, event: str, kwargs: dict[str, object]) -> None:
        if self.transport is None:
            return
        self.event_sent = True
        data = (subject.name if isinstance(subject, Qube) else "").encode("ascii", "replace")
        data += b"\0" + event.encode("ascii", "replace") + b"\0"
        data += "".join(f"{k}\0{wire_value(v)}\0" for k, v in kwargs.items()).encode(
            "ascii", "replace"
        )
        self.write(0x31, data + b"\0")

    def send_exception(self, err: exc.QubesException) -> None:
        self.write(0x32, type(err).__name__.encode() + b"\0\0" + str(err).encode("utf-8") + b"\0")


@dataclass
class QubesdServer:
    """Both qubesd sockets of one emulated dom0."""

    app: QubesApp
    paths: SimPaths
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        for server in self.servers:
            await server.wait_closed()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def cleanup_socket(path: Path) -> None:
    """Remove a stale socket only when nobody answers on it (R4.3 ``cleanup_socket``)."""
    if not path.exists() and not path.is_symlink():
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
    else:
        raise FileExistsError(errno.EEXIST, f"socket already exists: {str(path)!r}")
    finally:
        sock.close()


async def start_qubesd(app: QubesApp, paths: SimPaths) -> QubesdServer:
    """Bind ``qubesd.sock`` (Admin API) and ``qubesd.internal.sock`` (mode 0660)."""
    server = QubesdServer(app, paths)
    loop = asyncio.get_running_loop()
    paths.run.mkdir(parents=True, exist_ok=True)
    for sock_path, api in ((paths.qubesd_sock, "admin"), (paths.qubesd_internal_sock, "internal")):
        cleanup_socket(sock_path)
        old_umask = os.umask(0o117)
        try:
            srv = await loop.create_unix_server(
                lambda api=api: QubesdProtocol(app, api, server.tasks),  # type: ignore[misc]
                path=str(sock_path),
            )
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o660)
        server.servers.append(srv)
    return server
