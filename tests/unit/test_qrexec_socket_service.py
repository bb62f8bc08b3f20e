"""The emulated router's relay to a dom0 socket service (``streams.stream_socket``), held to
what qrexec does (``libqrexec/process_io.c``, ``remote.c``):

- a service that answers early and closes without reading all its input still has its answer
  relayed (qrexec treats the failed write as the end of input and keeps reading the output);
- a caller that hangs up ends the call: the service's socket is closed entirely, so the
  service sees ``POLLHUP`` (and not merely the end of its input).

The first case is made deterministic: the router's input pump is made ready, then the loop is
held while the service (a thread) answers and closes, so the router's next write to the
service fails before it has read the answer — the moment the answer used to be lost.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from pathlib import Path

import pytest

from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.qrexec.config import RouterConfig
from qubes_mcp.sim.qrexec.streams import stream_socket

CONFIG = RouterConfig(drain_timeout=1.0, call_timeout=20.0)
DESCRIPTOR = b"qmcp.Run+ mcp-control name ai-dev\0"
REPLY = b'{"ok":false,"error":{"code":"invalid-input"}}\n'


def _listen(tmp_path: Path) -> tuple[socket.socket, Path]:
    path = tmp_path / "service.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server, path


async def _caller_output() -> tuple[asyncio.StreamWriter, socket.socket]:
    """The router's writer towards the caller, and the caller's end to read frames from."""
    ours, theirs = socket.socketpair()
    _, writer = await asyncio.open_unix_connection(sock=ours)
    theirs.settimeout(10)
    return writer, theirs


def _frames(sock: socket.socket) -> list[tuple[int, bytes]]:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    out = []
    while data:
        kind, length = data[0], int.from_bytes(data[1:5], "big")
        out.append((kind, bytes(data[5 : 5 + length])))
        del data[: 5 + length]
    return out


def test_an_answer_given_before_all_input_was_read_is_still_relayed(tmp_path: Path) -> None:
    server, path = _listen(tmp_path)
    answered = threading.Event()
    go = threading.Event()

    def service() -> None:
        conn, _ = server.accept()
        got = b""
        while len(got) < len(DESCRIPTOR) + 10:
            got += conn.recv(65536)
        go.wait(10)
        conn.sendall(REPLY)
        conn.close()  # input left unread, as the gate does past its size cap
        answered.set()

    threading.Thread(target=service, daemon=True).start()

    async def main() -> list[tuple[int, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode_data(wire.STDIN, b"x" * 10))
        writer, caller = await _caller_output()
        call = asyncio.create_task(stream_socket(path, DESCRIPTOR, reader, writer, CONFIG))
        await asyncio.sleep(0.5)  # the service has its descriptor and first bytes
        # more input: the router's pump is now ready to write it to the service …
        reader.feed_data(wire.encode_data(wire.STDIN, b"y" * 65536))
        # … and before it runs, the service answers and closes (the loop is held meanwhile)
        go.set()
        assert answered.wait(10)
        reader.feed_data(wire.encode_frame(wire.STDIN, b""))
        reader.feed_eof()
        await asyncio.wait_for(call, 20)
        writer.close()
        return await asyncio.to_thread(_frames, caller)

    frames = asyncio.run(main())
    assert [kind for kind, _ in frames] == [wire.STDOUT, wire.EXIT]
    assert frames[0][1] == REPLY and wire.decode_exit(frames[1][1]) == 0


def test_a_caller_that_hangs_up_closes_the_service_socket_entirely(tmp_path: Path) -> None:
    server, path = _listen(tmp_path)
    result: dict[str, bool] = {}

    def service() -> None:
        conn, _ = server.accept()
        got = b""
        while not got.endswith(b"{}"):
            got += conn.recv(65536)
        assert conn.recv(1) == b""  # end of input: the caller sent its EOF
        poller = select.poll()
        poller.register(conn, 0)
        result["half-closed only"] = not poller.poll(0)
        # the caller now waits for the answer; when it goes away, the call must end
        result["hung up"] = bool(poller.poll(10_000))
        conn.close()

    thread = threading.Thread(target=service, daemon=True)
    thread.start()

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode_data(wire.STDIN, b"{}") + wire.encode_frame(wire.STDIN, b""))
        writer, caller = await _caller_output()
        call = asyncio.create_task(stream_socket(path, DESCRIPTOR, reader, writer, CONFIG))
        await asyncio.sleep(0.5)
        reader.feed_eof()  # the caller's connection ends without waiting for the answer
        await asyncio.wait_for(call, 20)
        writer.close()
        caller.close()

    asyncio.run(main())
    thread.join(15)
    assert result == {"half-closed only": True, "hung up": True}


@pytest.mark.parametrize("ending", ["no-eof-frame", "connection-reset"])
def test_a_caller_gone_before_its_input_ended_also_hangs_up(tmp_path: Path, ending: str) -> None:
    server, path = _listen(tmp_path)
    result: dict[str, bool] = {}

    def service() -> None:
        conn, _ = server.accept()
        poller = select.poll()
        poller.register(conn, 0)
        result["hung up"] = bool(poller.poll(10_000))
        conn.close()

    thread = threading.Thread(target=service, daemon=True)
    thread.start()

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode_data(wire.STDIN, b'{"partial'))
        writer, caller = await _caller_output()
        call = asyncio.create_task(stream_socket(path, DESCRIPTOR, reader, writer, CONFIG))
        await asyncio.sleep(0.3)
        if ending == "no-eof-frame":
            reader.feed_eof()
        else:
            reader.set_exception(ConnectionResetError())
        await asyncio.wait_for(call, 20)
        writer.close()
        caller.close()

    asyncio.run(main())
    thread.join(15)
    assert result == {"hung up": True}
