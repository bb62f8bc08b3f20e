"""Running a command in a qube from dom0, with ``qvm-run`` semantics and hard bounds.

The gate relays bytes without interpreting them: stdin in, stdout and stderr out (each capped
at ``limit`` bytes; the rest is drained and counted, never buffered), the exit code, and a
timeout after which the whole process group is killed. The command line is fixed here so that
nothing an agent sends can become a ``qvm-run`` option: every agent word comes after ``--``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 65536


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None when killed by the timeout
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    timed_out: bool

    @property
    def truncated(self) -> bool:
        return self.stdout_bytes > len(self.stdout) or self.stderr_bytes > len(self.stderr)


def qvm_run_argv(qvm_run: Path, qube: str, argv: list[str], *, user: str = "root") -> list[str]:
    return [
        str(qvm_run),
        "--pass-io",
        "--no-gui",
        "--no-filter-escape-chars",
        "--user",
        user,
        "--no-shell",
        "--",
        qube,
        *argv,
    ]


async def _drain(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, int]:
    kept = bytearray()
    total = 0
    while chunk := await stream.read(_CHUNK):
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept), total


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        proc.stdin.close()


async def run_command(
    argv: list[str], *, stdin: bytes, timeout: float, limit: int, env: dict[str, str] | None = None
) -> RunResult:
    """Run ``argv`` (a ``qvm_run_argv``), relay bytes, enforce the bounds."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    feeder = asyncio.create_task(_feed(proc, stdin))
    out_task = asyncio.create_task(_drain(proc.stdout, limit))
    err_task = asyncio.create_task(_drain(proc.stderr, limit))
    code: int | None
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        code = None
    # the process group is gone, so the pipes close; bound the wait anyway
    done, pending = await asyncio.wait({feeder, out_task, err_task}, timeout=10)
    for task in pending:
        task.cancel()
    out, out_n = out_task.result() if out_task in done else (b"", 0)
    err, err_n = err_task.result() if err_task in done else (b"", 0)
    return RunResult(code, out, err, out_n, err_n, code is None)
