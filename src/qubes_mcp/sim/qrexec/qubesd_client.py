"""The router's only way to reach qubesd: its Unix sockets, exactly as qrexec-daemon does.

One request per connection: ``method+arg SOURCE name DEST\\0payload``, half-close, read the
reply to EOF (qubes-internals §1.2, §1.4). ``0\\0…`` is success, ``2\\0Class\\0tb\\0msg\\0`` a
qubesd exception, and an empty reply means qubesd refused without saying why (R4.3).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from qubes_mcp.sim.paths import SimPaths

#: Replies larger than this are a broken or hostile server.
MAX_REPLY = 16 * 1024 * 1024


class QubesdError(Exception):
    """qubesd answered with an exception (``exc_class`` is its wire name)."""

    def __init__(self, exc_class: str, message: str) -> None:
        super().__init__(f"{exc_class}: {message}")
        self.exc_class = exc_class
        self.message = message


class QubesdUnavailableError(Exception):
    """qubesd could not be reached, refused silently, or sent a malformed reply."""


@dataclass(frozen=True)
class Event:
    subject: str
    name: str
    kwargs: Mapping[str, str]


def _header(method: str, arg: str, dest: str, source: str) -> bytes:
    name = f"{method}+{arg}" if arg else method
    return f"{name} {source} name {dest}\0".encode("ascii")


def parse_reply(reply: bytes) -> bytes:
    """Decode a non-streaming reply.

    Raises:
        QubesdError: a ``2`` (exception) reply.
        QubesdUnavailableError: empty or malformed reply.
    """
    if reply.startswith(b"0\0"):
        return reply[2:]
    if reply.startswith(b"2\0"):
        parts = reply[2:].split(b"\0")
        if len(parts) >= 3:
            return_class = parts[0].decode("ascii", errors="replace")
            raise QubesdError(return_class, parts[2].decode("utf-8", errors="replace"))
    raise QubesdUnavailableError(f"unexpected qubesd reply {reply[:40]!r}")


class QubesdClient:
    """Calls qubesd (and its internal socket) as ``dom0``."""

    def __init__(self, paths: SimPaths, *, timeout: float = 30.0) -> None:
        self.paths = paths
        self.timeout = timeout

    async def _raw(self, sock: str, request: bytes) -> bytes:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(sock), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise QubesdUnavailableError(f"cannot connect to {sock}: {exc}") from None
        try:
            writer.write(request)
            await writer.drain()
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(MAX_REPLY + 1), self.timeout)
            while chunk := await asyncio.wait_for(reader.read(MAX_REPLY + 1), self.timeout):
                reply += chunk
                if len(reply) > MAX_REPLY:
                    break
        except (OSError, TimeoutError) as exc:
            raise QubesdUnavailableError(f"qubesd call failed: {exc}") from None
        finally:
            writer.close()
        if len(reply) > MAX_REPLY:
            raise QubesdUnavailableError("qubesd reply too long")
        return reply

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> bytes:
        """One Admin API call as dom0 (the single transport method); the success content.

        Raises:
            QubesdError: qubesd raised an exception (wire class name in ``exc_class``).
            QubesdUnavailableError: no answer, an empty (refused) answer, or a malformed one.
        """
        reply = await self._raw(
            str(self.paths.qubesd_sock), _header(method, arg, dest, "dom0") + payload
        )
        return parse_reply(reply)

    async def system_info(self) -> dict[str, Any]:
        """``internal.GetSystemInfo``: the JSON the policy engine evaluates against."""
        reply = await self._raw(
            str(self.paths.qubesd_internal_sock),
            _header("internal.GetSystemInfo", "", "dom0", "dom0"),
        )
        try:
            info = json.loads(parse_reply(reply))
        except json.JSONDecodeError as exc:
            raise QubesdUnavailableError(f"bad system info: {exc}") from None
        if not isinstance(info, dict) or not isinstance(info.get("domains"), dict):
            raise QubesdUnavailableError("system info lacks 'domains'")
        return info

    async def start(self, vm: str) -> None:
        """``admin.vm.Start``; a qube that is already running is fine (as qrexec-daemon)."""
        try:
            await self.call(vm, "admin.vm.Start")
        except QubesdError as exc:
            if exc.exc_class != "QubesVMNotHaltedError":
                raise

    async def create_disposable(self, template: str) -> str:
        """``admin.vm.CreateDisposable`` on a disposable template; returns ``uuid:…``."""
        reply = await self.call(template, "admin.vm.CreateDisposable", payload=b"uuid")
        return reply.decode("ascii", errors="replace").strip()

    async def kill(self, vm: str) -> None:
        await self.call(vm, "admin.vm.Kill")

    async def events(self) -> AsyncIterator[Event]:
        """``admin.Events`` on dom0: every event until the connection drops."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.paths.qubesd_sock)), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise QubesdUnavailableError(f"cannot connect to qubesd: {exc}") from None
        try:
            writer.write(_header("admin.Events", "", "dom0", "dom0"))
            await writer.drain()
            writer.write_eof()
            buf = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise QubesdUnavailableError("event stream message too long")
                while True:
                    event, buf = _split_event(buf)
                    if event is None:
                        break
                    yield event
        finally:
            writer.close()


def _split_event(buf: bytes) -> tuple[Event | None, bytes]:
    """One complete ``1\\0subject\\0event\\0(k\\0v\\0)*\\0`` message from the front of ``buf``."""
    if len(buf) < 2:
        return None, buf
    if not buf.startswith(b"1\0"):
        raise QubesdUnavailableError(f"unexpected message in event stream: {buf[:40]!r}")
    fields: list[bytes] = []
    pos = 2
    while True:
        end = buf.find(b"\0", pos)
        if end < 0:
            return None, buf
        field = buf[pos:end]
        pos = end + 1
        if len(fields) >= 2 and len(fields) % 2 == 0 and field == b"":
            break
        fields.append(field)
    subject, name, *rest = (f.decode("utf-8", errors="replace") for f in fields)
    kwargs = dict(zip(rest[0::2], rest[1::2], strict=True))
    return Event(subject, name, kwargs), buf[pos:]
