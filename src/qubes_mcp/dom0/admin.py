"""The gate's own Admin API client: one ``call`` over qubesd's socket, as dom0.

Standard library only (dom0 has no ``qubesadmin`` guarantee for our purposes, and we want the
exact bytes under our control). It speaks the R4.3 framing (``method+arg dom0 name dest\\0``,
payload, EOF; reply ``0\\0…``, ``2\\0Class\\0\\0message\\0``, or zero bytes for a refusal) and
counts its round trips so tests and benchmarks can bound them.

Errors are gate refusals: ``QubesdError`` (qubesd answered with an exception: its class is
kept for mapping and for the audit log, its message never reaches an agent),
``QubesdRefusedError`` (zero bytes: R4.3's PermissionDenied/ProtocolError/other), and
``QubesdUnavailableError`` (the socket cannot be reached).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

from qubes_mcp.dom0.errors import FailedError, UnavailableError

MAX_REPLY = 64 << 20


class QubesdError(FailedError):
    """qubesd reported an exception."""

    def __init__(self, exc_class: str, qubesd_message: str) -> None:
        super().__init__(None, reason=f"qubesd {exc_class}")
        self.exc_class = exc_class
        #: for the dom0 journal only
        self.qubesd_message = qubesd_message


class QubesdRefusedError(QubesdError):
    """qubesd closed the connection without a reply (how R4.3 refuses)."""

    def __init__(self) -> None:
        super().__init__("EmptyReply", "qubesd sent no reply")


class QubesdUnavailableError(UnavailableError):
    def __init__(self, why: str) -> None:
        super().__init__(None, reason=f"qubesd unreachable: {why}")


@dataclass(frozen=True)
class Event:
    subject: str
    name: str
    kwargs: dict[str, str]


def parse_reply(data: bytes) -> str:
    """Decode one qubesd reply, raising the matching error."""
    if not data:
        raise QubesdRefusedError
    if data.startswith(b"0\0"):
        return data[2:].decode("utf-8", errors="replace")
    if data.startswith(b"2\0"):
        parts = data[2:].split(b"\0")
        exc_class = parts[0].decode("ascii", errors="replace") if parts else "?"
        message = parts[2].decode("utf-8", errors="replace") if len(parts) > 2 else ""
        raise QubesdError(exc_class, message)
    raise QubesdError("InvalidReply", "reply has no known header")


class AdminClient:
    """Talks to qubesd as dom0. One connection per call, like every qubesd client."""

    def __init__(self, socket_path: Path, *, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.round_trips = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=MAX_REPLY), 10
            )
        except (OSError, TimeoutError) as exc:
            raise QubesdUnavailableError(type(exc).__name__) from None

    @staticmethod
    def header(dest: str, method: str, arg: str = "") -> bytes:
        return f"{method}+{arg} dom0 name {dest}\0".encode("ascii")

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        """One Admin API call; returns the reply text or raises."""
        self.round_trips += 1
        reader, writer = await self._open()
        try:
            writer.write(self.header(dest, method, arg) + payload)
            await writer.drain()
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(MAX_REPLY + 1), self.timeout)
            rest = data
            while rest and len(data) <= MAX_REPLY:
                rest = await asyncio.wait_for(reader.read(MAX_REPLY + 1 - len(data)), self.timeout)
                data += rest
        except TimeoutError:
            raise QubesdUnavailableError("timeout") from None
        except OSError as exc:
            raise QubesdUnavailableError(type(exc).__name__) from None
        finally:
            writer.close()
        if len(data) > MAX_REPLY:
            raise QubesdError("ReplyTooLong", "reply exceeds the gate's limit")
        return parse_reply(data)

    async def lines(self, dest: str, method: str, arg: str = "") -> list[str]:
        """A list-style reply: one item per ``\\n``-terminated line."""
        text = await self.call(dest, method, arg)
        return text.split("\n")[:-1] if text else []

    async def events(self, dest: str = "dom0") -> AsyncGenerator[Event, None]:
        """``admin.Events`` as an async iterator; the caller stops by breaking out."""
        self.round_trips += 1
        reader, writer = await self._open()
        try:
            writer.write(self.header(dest, "admin.Events"))
            await writer.drain()
            writer.write_eof()
            while True:
                head = await reader.readexactly(2)
                if head != b"1\0":
                    raise QubesdError("InvalidReply", "unexpected message in event stream")
                subject = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
                name = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
                kwargs: dict[str, str] = {}
                while True:
                    key = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
                    if not key:
                        break
                    kwargs[key] = (await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
                yield Event(subject, name, kwargs)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            raise QubesdUnavailableError("event stream ended") from None
        finally:
            writer.close()
