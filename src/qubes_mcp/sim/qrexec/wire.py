"""The router's byte protocol, spoken on ``router_sock`` and on every qube's agent socket.

Real qrexec moves a call over vchan with ``MSG_TRIGGER_SERVICE3`` and data messages; we keep
the same shape on a Unix stream socket as a sequence of frames, each ``type (1 byte)``,
``length (4 bytes, big endian)``, ``data``:

* client → router: one ``REQUEST`` (``target NUL service+arg NUL source``; the source field
  is honoured only on the dom0-side control socket, a qube's socket names its own source),
  then ``STDIN`` frames, an empty ``STDIN`` frame meaning end of input.
* router → client: first the verdict, ``ACCEPTED`` or ``REFUSED`` (policy said no, or the
  target could not be started: the client prints ``Request refused`` and exits 126, as
  ``qrexec-client-vm`` does; the connection then ends). After ``ACCEPTED`` — sent only once
  the target runs, so a local program starts only for an allowed call — ``STDOUT`` /
  ``STDERR`` frames, then exactly one ``EXIT`` (a signed 32-bit exit code).

Standard library only: the in-qube shims import this module inside a sandbox.
"""

from __future__ import annotations

import socket
import struct

TYPE_CHECKING = False  # not typing's: a per-call client must not pay for importing typing
if TYPE_CHECKING:  # asyncio is imported where it is used: the dom0 line and the in-qube shims
    import asyncio  # start a fresh interpreter per call and must not pay for it

REQUEST = 0x01
STDIN = 0x02
STDOUT = 0x03
STDERR = 0x04
EXIT = 0x05
REFUSED = 0x06
ACCEPTED = 0x07
FRAME_TYPES = frozenset({REQUEST, STDIN, STDOUT, STDERR, EXIT, REFUSED, ACCEPTED})

_HEADER = struct.Struct(">BI")
HEADER_LEN = _HEADER.size

#: qrexec's MAX_SERVICE_NAME_LEN (whole ``service+arg``), plus room for target and source.
MAX_REQUEST_LEN = 65000 + 64 + 64 + 2
#: Largest data frame either side may send; bigger payloads are split.
MAX_DATA_LEN = 65536
#: ``qrexec-client-vm`` exit codes (QX ``agent/qrexec-client-vm.rst``).
EXIT_REFUSED = 126
EXIT_LOCAL_PROBLEM = 125
EXIT_NOT_FOUND = 127
REFUSED_MESSAGE = b"Request refused\n"


class WireError(Exception):
    """The peer sent bytes that are not a valid frame sequence (hostile or broken peer)."""


class UntrustedRequest:
    """A request exactly as received; every field still needs sanitising.

    (A plain class, not a dataclass: importing dataclasses would cost every per-call client
    several milliseconds.)"""

    __slots__ = ("untrusted_service", "untrusted_source", "untrusted_target")

    def __init__(
        self, untrusted_target: bytes, untrusted_service: bytes, untrusted_source: bytes
    ) -> None:
        self.untrusted_target = untrusted_target
        self.untrusted_service = untrusted_service
        self.untrusted_source = untrusted_source

    def _fields(self) -> tuple[bytes, bytes, bytes]:
        return (self.untrusted_target, self.untrusted_service, self.untrusted_source)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UntrustedRequest):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        t, s, src = self._fields()
        return (
            f"UntrustedRequest(untrusted_target={t!r}, untrusted_service={s!r}, "
            f"untrusted_source={src!r})"
        )


def encode_frame(kind: int, data: bytes = b"") -> bytes:
    """One frame; ``data`` must fit the limit of its kind."""
    limit = MAX_REQUEST_LEN if kind == REQUEST else MAX_DATA_LEN
    if kind not in FRAME_TYPES or len(data) > limit:
        raise ValueError(f"cannot encode frame type {kind} of {len(data)} bytes")
    return _HEADER.pack(kind, len(data)) + data


def encode_data(kind: int, data: bytes) -> bytes:
    """``data`` as as many frames of ``kind`` as needed (no frame when empty)."""
    return b"".join(
        encode_frame(kind, data[i : i + MAX_DATA_LEN]) for i in range(0, len(data), MAX_DATA_LEN)
    )


def encode_request(target: str, service_and_arg: str, source: str = "") -> bytes:
    """The ``REQUEST`` frame. Fields may not contain NUL."""
    fields = [target.encode(), service_and_arg.encode(), source.encode()]
    if any(b"\0" in f for f in fields):
        raise ValueError("request fields may not contain NUL")
    return encode_frame(REQUEST, b"\0".join(fields))


def encode_exit(code: int) -> bytes:
    return encode_frame(EXIT, struct.pack(">i", code))


def decode_exit(untrusted_data: bytes) -> int:
    if len(untrusted_data) != 4:
        raise WireError("EXIT frame must carry 4 bytes")
    code: int = struct.unpack(">i", untrusted_data)[0]
    return code


def parse_request(untrusted_data: bytes) -> UntrustedRequest:
    """Split a ``REQUEST`` frame's data; does not sanitise the fields."""
    parts = untrusted_data.split(b"\0")
    if len(parts) != 3:
        raise WireError("REQUEST must have exactly three NUL-separated fields")
    return UntrustedRequest(parts[0], parts[1], parts[2])


def _check_header(header: bytes) -> tuple[int, int]:
    kind, length = _HEADER.unpack(header)
    if kind not in FRAME_TYPES:
        raise WireError(f"unknown frame type {kind:#x}")
    limit = MAX_REQUEST_LEN if kind == REQUEST else MAX_DATA_LEN
    if length > limit:
        raise WireError(f"frame of {length} bytes exceeds the {limit}-byte limit")
    return kind, length


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """Next frame, or ``None`` on a clean end of stream between frames.

    Raises:
        WireError: bad type, over-long frame, or a stream cut inside a frame.
    """
    import asyncio

    try:
        header = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError("stream ended inside a frame header") from None
    kind, length = _check_header(header)
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise WireError("stream ended inside a frame") from None
    return kind, data


def _recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = count
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if remaining == count:
                return None
            raise WireError("stream ended inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame_sync(sock: socket.socket) -> tuple[int, bytes] | None:
    """Blocking twin of :func:`read_frame` for the in-qube shims."""
    header = _recv_exactly(sock, HEADER_LEN)
    if header is None:
        return None
    kind, length = _check_header(header)
    data = _recv_exactly(sock, length) if length else b""
    if data is None:
        raise WireError("stream ended inside a frame")
    return kind, data
