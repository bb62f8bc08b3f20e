"""Moving a call's bytes between the caller's frames and a service (process or socket)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.qrexec.config import RouterConfig

log = logging.getLogger("qubes_mcp.sim.qrexec")


async def _pump_input(
    reader: asyncio.StreamReader,
    deliver: Callable[[bytes], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    on_hangup: Callable[[], None] | None = None,
) -> None:
    """Caller's STDIN frames to ``deliver`` until the empty frame; then ``close``.

    With ``on_hangup``, the caller's connection is then watched until it ends, and its end
    (or an end before the empty frame) is reported: qrexec ends a call when the calling side
    goes away, and a service must learn that its caller has hung up.
    """
    delivering = True
    try:
        while True:
            frame = await wire.read_frame(reader)
            if frame is None:
                if on_hangup is not None:  # gone without ending its input: a hang-up
                    on_hangup()
                    return
                break
            kind, data = frame
            if kind != wire.STDIN:
                raise wire.WireError(f"unexpected frame {kind:#x} from the caller")
            if not data:
                break
            if delivering:
                try:
                    await deliver(data)
                except (ConnectionError, OSError):
                    delivering = False  # the service stopped reading; keep draining the caller
    except (ConnectionError, asyncio.IncompleteReadError):
        if on_hangup is None:
            raise
        on_hangup()
        return
    with contextlib.suppress(ConnectionError, OSError):
        await close()
    if on_hangup is not None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.read(65536):
                pass  # nothing more is expected; wait for the caller to go
        on_hangup()


async def _pump_output(
    source: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: int
) -> None:
    while chunk := await source.read(wire.MAX_DATA_LEN):
        writer.write(wire.encode_frame(kind, chunk))
        await writer.drain()


async def _finish(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    code: int,
    input_task: asyncio.Task[None],
    config: RouterConfig,
) -> None:
    """Send the exit code, then let the caller finish sending before closing, so its last
    frames are not answered with a reset that would destroy the reply it has not read."""
    writer.write(wire.encode_exit(code))
    await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(input_task), config.drain_timeout)
    if not input_task.done():
        input_task.cancel()
    with contextlib.suppress(Exception):
        while await asyncio.wait_for(reader.read(65536), config.drain_timeout):
            pass


async def stream_process(
    proc: asyncio.subprocess.Process,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: RouterConfig,
    kill: Callable[[], None] | None = None,
) -> None:
    """Stream a process's stdin/stdout/stderr to and from the caller, then its exit code.

    ``kill`` ends the process (and everything it started) when the call outlives
    ``config.call_timeout``; by default its process group is killed.
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def deliver(data: bytes) -> None:
        stdin.write(data)
        await stdin.drain()

    async def close() -> None:
        stdin.close()

    input_task = asyncio.create_task(_pump_input(reader, deliver, close))
    try:
        async with asyncio.timeout(config.call_timeout):
            await asyncio.gather(
                _pump_output(proc.stdout, writer, wire.STDOUT),
                _pump_output(proc.stderr, writer, wire.STDERR),
                proc.wait(),
            )
    except TimeoutError:
        if kill is not None:
            kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    code = proc.returncode if proc.returncode is not None else 1
    if code < 0:
        code = 128 - code  # killed by a signal: the shell convention qrexec follows
    await _finish(reader, writer, code, input_task, config)


async def stream_socket(
    path: Path,
    descriptor: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: RouterConfig,
) -> None:
    """A socket service: descriptor, then the caller's input; its output until EOF; exit 0.

    As qrexec does (``libqrexec/process_io.c``, ``remote.c``): when the service stops taking
    input (it answered early and closed), further input is discarded and its output is still
    relayed to the end; when the caller hangs up, the service's socket is closed entirely (the
    service sees its peer gone, not just the end of input). The service side is a plain
    socket rather than an asyncio stream, whose failed write would also discard the unread
    reply.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, str(path))
    except OSError as exc:
        sock.close()
        log.warning("socket service %s unreachable: %s", path, exc)
        writer.write(wire.encode_exit(wire.EXIT_NOT_FOUND))
        await writer.drain()
        return
    caller_gone = asyncio.Event()

    async def deliver(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    async def close() -> None:
        sock.shutdown(socket.SHUT_WR)

    async def relay_output() -> None:
        while True:
            try:
                chunk = await loop.sock_recv(sock, wire.MAX_DATA_LEN)
            except ConnectionResetError:
                chunk = b""  # the service closed with input unread: its output is complete
            if not chunk:
                return
            writer.write(wire.encode_frame(wire.STDOUT, chunk))
            await writer.drain()

    try:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, descriptor)
        input_task = asyncio.create_task(
            _pump_input(reader, deliver, close, on_hangup=caller_gone.set)
        )
        output = asyncio.create_task(relay_output())
        gone = asyncio.create_task(caller_gone.wait())
        try:
            async with asyncio.timeout(config.call_timeout):
                await asyncio.wait({output, gone}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            pass
        finally:
            gone.cancel()
            answered = output.done()
            if not answered:
                output.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await output
    finally:
        sock.close()  # after a hang-up: the service sees its peer gone
    if not answered and caller_gone.is_set():
        return  # nobody left to answer
    await _finish(reader, writer, 0, input_task, config)


async def stream_agent(
    agent_reader: asyncio.StreamReader,
    agent_writer: asyncio.StreamWriter,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    config: RouterConfig,
) -> None:
    """Relay a call between the caller and a qube's agent (both speak :mod:`.wire` frames).

    The agent is inside the qube: every frame it sends is checked (only ``STDOUT``,
    ``STDERR`` and one ``EXIT``); anything else, or an agent that hangs up without an exit
    code, ends the call with exit code 1. After ``config.call_timeout`` the router hangs up
    on the agent; like a real qrexec-agent, the agent then leaves the command running (a
    caller that wants it ended runs it under ``timeout`` in the qube).
    """

    async def deliver(data: bytes) -> None:
        agent_writer.write(wire.encode_data(wire.STDIN, data))
        await agent_writer.drain()

    async def close() -> None:
        agent_writer.write(wire.encode_frame(wire.STDIN, b""))
        await agent_writer.drain()

    async def relay_output() -> int:
        while True:
            frame = await wire.read_frame(agent_reader)
            if frame is None:
                return 1
            kind, data = frame
            if kind in (wire.STDOUT, wire.STDERR):
                if data:
                    writer.write(wire.encode_frame(kind, data))
                    await writer.drain()
            elif kind == wire.EXIT:
                return wire.decode_exit(data)
            else:
                raise wire.WireError(f"unexpected frame {kind:#x} from the agent")

    input_task = asyncio.create_task(_pump_input(reader, deliver, close))
    code = 1
    try:
        async with asyncio.timeout(config.call_timeout):
            code = await relay_output()
    except (TimeoutError, wire.WireError, ConnectionError) as exc:
        log.info("call to a qube ended: %s", exc or type(exc).__name__)
    await _finish(reader, writer, code, input_task, config)
