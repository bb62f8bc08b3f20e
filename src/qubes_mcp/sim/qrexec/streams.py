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
) -> None:
    """Caller's STDIN frames to ``deliver`` until the empty frame; then ``close``."""
    delivering = True
    while True:
        frame = await wire.read_frame(reader)
        if frame is None:
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
    with contextlib.suppress(ConnectionError, OSError):
        await close()


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

    The service's socket is driven with plain socket calls, not a transport: a service may
    answer and close before it read all the input (the gate refusing an oversized request),
    and a failed write must then stop the input only, not throw away the answer already on its
    way (an asyncio transport aborts both directions on a write error).
    """
    loop = asyncio.get_running_loop()
    service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    service.setblocking(False)
    try:
        await loop.sock_connect(service, str(path))
        await loop.sock_sendall(service, descriptor)
    except OSError as exc:
        service.close()
        log.warning("socket service %s unreachable: %s", path, exc)
        writer.write(wire.encode_exit(wire.EXIT_NOT_FOUND))
        await writer.drain()
        return

    async def deliver(data: bytes) -> None:
        await loop.sock_sendall(service, data)

    async def close() -> None:
        service.shutdown(socket.SHUT_WR)

    async def relay_output() -> None:
        while True:
            try:
                chunk = await loop.sock_recv(service, wire.MAX_DATA_LEN)
            except ConnectionError:
                return
            if not chunk:
                return
            writer.write(wire.encode_frame(wire.STDOUT, chunk))
            await writer.drain()

    input_task = asyncio.create_task(_pump_input(reader, deliver, close))
    try:
        try:
            async with asyncio.timeout(config.call_timeout):
                await relay_output()
        except (TimeoutError, ConnectionError):
            pass
        await _finish(reader, writer, 0, input_task, config)
    finally:
        if not input_task.done():  # no send may be pending on a closed descriptor
            input_task.cancel()
            with contextlib.suppress(BaseException):
                await input_task
        service.close()


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
