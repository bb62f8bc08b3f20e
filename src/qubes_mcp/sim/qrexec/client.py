"""Calling a qrexec service from the host side of the emulator (what ``sim call`` does).

The dom0-side control socket lets the caller name its source: it stands for
``qrexec-client-vm`` running inside that qube. Only host tools can reach it; qubes reach the
router through their own agent socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec import wire


class RouterUnavailableError(Exception):
    """The router's control socket cannot be reached (is ``sim run`` running?)."""


@dataclass(frozen=True)
class CallResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def _stream_chunks(stream: BinaryIO) -> asyncio.Queue[bytes]:
    """Chunks of ``stream`` as they arrive (``b""`` at EOF), read by a daemon thread: a call
    that ends while the terminal still has stdin open must not wait for it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
    read = getattr(stream, "read1", stream.read)  # read1: forward what is there, don't wait

    def pump() -> None:
        while True:
            try:
                chunk = read(wire.MAX_DATA_LEN)
            except (OSError, ValueError):
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # the loop is gone: the call is over
            if not chunk:
                return

    threading.Thread(target=pump, name="qrexec-call-stdin", daemon=True).start()
    return queue


async def _send_input(writer: asyncio.StreamWriter, stdin: bytes | BinaryIO) -> None:
    try:
        if isinstance(stdin, bytes | bytearray):
            writer.write(wire.encode_data(wire.STDIN, bytes(stdin)))
        else:
            queue = _stream_chunks(stdin)
            while chunk := await queue.get():
                writer.write(wire.encode_data(wire.STDIN, chunk))
                await writer.drain()
        writer.write(wire.encode_frame(wire.STDIN, b""))
        await writer.drain()
    except (ConnectionError, OSError):
        pass  # the call already ended


async def call(
    paths: SimPaths,
    *,
    source: str,
    target: str,
    service_and_arg: str,
    stdin: bytes | BinaryIO = b"",
    timeout: float = 60.0,
    on_stdout: Callable[[bytes], None] | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    socket_path: Path | None = None,
) -> CallResult:
    """Call ``service_and_arg`` on ``target`` as ``source``.

    ``socket_path`` selects another router socket (``paths.dom0_direct_sock`` for dom0's
    policy-free line to a qube, where ``source`` names the user). Output is collected in the
    result, or handed to ``on_stdout``/``on_stderr`` as it arrives
    (then the result's byte fields stay empty). A refusal is ``exit_code == 126`` with
    ``Request refused`` on stderr.

    Raises:
        RouterUnavailableError: no router listens at ``paths.router_sock``.
        TimeoutError: the call took longer than ``timeout``.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path or paths.router_sock))
    except OSError as exc:
        raise RouterUnavailableError(f"cannot reach the qrexec router: {exc}") from None
    out = bytearray()
    err = bytearray()
    emit_out = on_stdout or out.extend
    emit_err = on_stderr or err.extend
    sender: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(timeout):
            writer.write(wire.encode_request(target.replace("$", "@"), service_and_arg, source))
            await writer.drain()
            verdict = await wire.read_frame(reader)
            if verdict is None or verdict[0] != wire.ACCEPTED:
                emit_err(wire.REFUSED_MESSAGE)
                return CallResult(wire.EXIT_REFUSED, bytes(out), bytes(err))
            sender = asyncio.create_task(_send_input(writer, stdin))
            while True:
                frame = await wire.read_frame(reader)
                if frame is None:
                    return CallResult(1, bytes(out), bytes(err))
                kind, data = frame
                if kind == wire.STDOUT:
                    emit_out(data)
                elif kind == wire.STDERR:
                    emit_err(data)
                elif kind == wire.EXIT:
                    return CallResult(wire.decode_exit(data), bytes(out), bytes(err))
                else:
                    raise wire.WireError(f"unexpected frame {kind:#x} from the router")
    finally:
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def sim_call_main(root: Path, source: str, target: str, service_and_arg: str) -> int:
    """``qubes-mcp sim call``: stdin → the service, its stdout/stderr → ours; exit code as
    ``qrexec-client-vm`` (126 and ``Request refused`` when denied)."""

    def write_out(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def write_err(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()

    try:
        result = asyncio.run(
            call(
                SimPaths(root),
                source=source,
                target=target,
                service_and_arg=service_and_arg,
                stdin=sys.stdin.buffer,
                timeout=3600.0,
                on_stdout=write_out,
                on_stderr=write_err,
            )
        )
    except RouterUnavailableError as exc:
        print(f"qubes-mcp sim call: {exc}", file=sys.stderr)
        return wire.EXIT_LOCAL_PROBLEM
    except (TimeoutError, wire.WireError, ConnectionError) as exc:
        print(f"qubes-mcp sim call: {exc}", file=sys.stderr)
        return 1
    return result.exit_code
