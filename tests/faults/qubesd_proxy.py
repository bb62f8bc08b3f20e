"""A unix-socket proxy in front of qubesd that can fail the gate at a chosen Admin API call.

The gate speaks to qubesd one connection per call (``method+arg src type dest\\0`` payload,
EOF; one reply), so the proxy sees every call whole. A test sets :attr:`QubesdProxy.fault`,
which is asked about each call in order and answers what to do with it:

- ``None``: forward it.
- ``"kill"``: forward it, let qubesd act, then SIGKILL the gate before the reply reaches it
  (the gate dies with call N done and not known to it — every prefix of a call sequence).
- ``"drop"``: close the connection unforwarded, then take qubesd "down" (the socket goes away
  until :meth:`up`): qubesd stopped, or restarting, in the middle of a birth.
- ``"bounce"``: close the connection unforwarded and stay up: qubesd restarted, losing the
  call in flight; the next call reaches the new qubesd.
- ``"hold"``: forward it only once :attr:`release` is set: qubesd hung.

:attr:`QubesdProxy.before` runs before any call is forwarded: the operator (or another
dom0 client) changing something between the gate's decision and its action.

With ``inherit=True`` the proxy also plays R4.3's DispVM inheritance, which the emulator does
not yet (issue 8): after an ``admin.vm.Create.DispVM`` it copies the template's tags, features
and ``provides_network`` onto the new disposable, before the gate gets the reply — what
``qubes/vm/dispvm.py`` ``DispVM.__init__`` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from qubes_mcp.dom0.admin import AdminClient


@dataclass(frozen=True)
class Call:
    method: str
    arg: str
    dest: str
    payload: bytes


Fault = Callable[[int, Call], str | None]
Hook = Callable[[AdminClient, Call], Awaitable[None]]


@dataclass
class QubesdProxy:
    listen: Path
    upstream: Path
    inherit: bool = False
    fault: Fault | None = None
    #: awaited before a call is forwarded (with a client straight to qubesd): a race by dom0
    before: Hook | None = None
    gate_pid: int | None = None
    calls: list[Call] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.AbstractServer | None = None
    _thread: threading.Thread | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # --- lifecycle (from the test thread) ----------------------------------------------------

    def start(self) -> QubesdProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._listen())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._on_loop(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)

    def down(self) -> None:
        self._on_loop(self._close())

    def up(self) -> None:
        self._on_loop(self._listen())

    def _on_loop(self, coro: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        if self._server is None:
            self.listen.unlink(missing_ok=True)
            self._server = await asyncio.start_unix_server(self._serve, str(self.listen))

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.listen.unlink(missing_ok=True)

    # --- one call -----------------------------------------------------------------------------

    async def _forward(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(self.upstream))
        writer.write(raw)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        return reply

    async def _stream(self, raw: bytes, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(self.upstream))
        upstream_writer.write(raw)
        upstream_writer.write_eof()
        try:
            while chunk := await upstream_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            upstream_writer.close()

    async def _inherit(self, call: Call) -> None:
        """R4.3's DispVM.__init__: clone properties, features and tags of the template."""
        admin = AdminClient(self.upstream)
        name = dict(kv.split("=", 1) for kv in call.payload.decode().split())["name"]
        template = call.arg
        for tag in await admin.lines(template, "admin.vm.tag.List"):
            await admin.call(name, "admin.vm.tag.Set", tag)
        for feature in await admin.lines(template, "admin.vm.feature.List"):
            value = await admin.call(template, "admin.vm.feature.Get", feature)
            await admin.call(name, "admin.vm.feature.Set", feature, value.encode())
        provides = await admin.call(template, "admin.vm.property.Get", "provides_network")
        if provides.split(" ", 2)[-1] == "True":
            await admin.call(name, "admin.vm.property.Set", "provides_network", b"True")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Python 3.11's start_unix_server keeps no reference to this task: hold one, or the
        # garbage collector may close it mid-call (the gate then reads an empty reply), which
        # happens as soon as the gate has two calls in flight (dom0/daemon.py does the same)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_call(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve_call(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = await reader.read()
        header, _, payload = raw.partition(b"\0")
        service, _src, _kind, dest = header.decode("ascii", "replace").split(" ")
        method, _, arg = service.partition("+")
        call = Call(method, arg, dest, payload)
        index = len(self.calls)
        self.calls.append(call)
        action = self.fault(index, call) if self.fault is not None else None
        try:
            if action in ("drop", "bounce"):
                if action == "drop":
                    await self._close()
                return
            if action == "kill-before":  # the gate dies before this call reaches qubesd
                assert self.gate_pid is not None
                os.kill(self.gate_pid, signal.SIGKILL)
                return
            if action == "hold":
                await asyncio.to_thread(self.release.wait, 60)
            if self.before is not None:
                await self.before(AdminClient(self.upstream), call)
            if method == "admin.Events":  # a stream, not one reply: relay it as it comes
                await self._stream(raw, writer)
                return
            reply = await self._forward(raw)
            if self.inherit and method == "admin.vm.Create.DispVM" and reply.startswith(b"0\0"):
                await self._inherit(call)
            if action == "kill":
                assert self.gate_pid is not None
                os.kill(self.gate_pid, signal.SIGKILL)
                return
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
