"""The router's frame protocol: round trips, and hostile frames refused by type."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.sim.qrexec import wire


def read_all_frames(data: bytes) -> list[tuple[int, bytes]]:
    async def main() -> list[tuple[int, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        while (frame := await wire.read_frame(reader)) is not None:
            frames.append(frame)
        return frames

    return asyncio.run(main())


def test_request_round_trip_keeps_fields_apart() -> None:
    frames = read_all_frames(wire.encode_request("@dispvm:dvm", "qubes.VMExec+ls", "work"))
    assert len(frames) == 1
    kind, data = frames[0]
    assert kind == wire.REQUEST
    req = wire.parse_request(data)
    assert req == wire.UntrustedRequest(b"@dispvm:dvm", b"qubes.VMExec+ls", b"work")


def test_large_payload_is_split_into_bounded_frames() -> None:
    payload = bytes(range(256)) * 1000  # 256000 bytes
    frames = read_all_frames(wire.encode_data(wire.STDIN, payload))
    assert all(len(d) <= wire.MAX_DATA_LEN for _, d in frames)
    assert b"".join(d for _, d in frames) == payload


def test_exit_code_is_signed_32_bit() -> None:
    (frame,) = read_all_frames(wire.encode_exit(-9))
    assert wire.decode_exit(frame[1]) == -9


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack(">BI", 0x7F, 0), id="unknown-frame-type"),
        pytest.param(struct.pack(">BI", wire.STDIN, wire.MAX_DATA_LEN + 1), id="oversized-data"),
        pytest.param(
            struct.pack(">BI", wire.REQUEST, wire.MAX_REQUEST_LEN + 1), id="oversized-request"
        ),
        pytest.param(struct.pack(">BI", wire.STDIN, 10) + b"short", id="truncated-frame"),
        pytest.param(b"\x02\x00", id="truncated-header"),
    ],
)
def test_hostile_frames_raise_wire_error(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        read_all_frames(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"only-two\0fields", id="missing-field"),
        pytest.param(b"a\0b\0c\0d", id="extra-field"),
    ],
)
def test_malformed_request_fields_are_refused(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.parse_request(data)


def test_exit_frame_of_wrong_size_is_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_exit(b"\0\0\0")


def test_request_fields_cannot_smuggle_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        wire.encode_request("work\0dom0", "qubes.VMShell")


def test_sync_reader_matches_async_reader() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(wire.encode_frame(wire.STDOUT, b"abc") + wire.encode_exit(3))
        left.shutdown(socket.SHUT_WR)
        assert wire.read_frame_sync(right) == (wire.STDOUT, b"abc")
        kind, data = wire.read_frame_sync(right) or (0, b"")
        assert (kind, wire.decode_exit(data)) == (wire.EXIT, 3)
        assert wire.read_frame_sync(right) is None


@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    try:
        frames = read_all_frames(data)
    except wire.WireError:
        return
    assert all(kind in wire.FRAME_TYPES for kind, _ in frames)
