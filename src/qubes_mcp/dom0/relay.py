"""Running a command in a qube from dom0, with hard bounds that hold inside the qube.

The gate relays bytes without interpreting them: stdin in, stdout and stderr out (each capped
at ``limit`` bytes; the rest is drained and counted, never buffered) and the exit code.

The line is dom0's own ``qrexec-client -d QUBE USER:QUBESRPC qubes.VMExec+ARGS dom0``
(``/usr/lib/qubes/qrexec-client`` in dom0, the emulator's under its root): no policy, no
interpreter started per call, and the argv travels VMExec-encoded, so no agent word is ever
parsed by a shell or read as an option. The qube must run already (the caller starts it).

Ending a command is done *in the qube*, because on Qubes killing the dom0-side client does not
stop the process there:

* the command runs as ``env QMCP_RUN_ID=ID timeout --signal=TERM --kill-after=K T ARGV``:
  coreutils ``timeout`` puts itself and the command in a new process group and signals the
  whole group when ``T`` seconds pass (SIGKILL ``K`` seconds later if needed);
* every process of the run carries ``QMCP_RUN_ID=ID`` in its environment (children inherit
  it), so :func:`cancel_in_qube` can find and kill them by a second call into the qube: when
  the gate stops while the command runs (the relay's task is cancelled), when the qube does
  not answer by the dom0-side deadline, and, for runs a previous gate left behind, when the
  gate starts again (the ids come from its journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 65536
#: The environment variable that marks every process of one run inside the qube.
RUN_MARKER = "QMCP_RUN_ID"
#: Seconds between ``timeout``'s SIGTERM and its SIGKILL.
KILL_AFTER = 2
#: Extra seconds dom0 waits past the in-qube deadline before it gives up on the qube.
DOM0_MARGIN = 5.0
#: How long a cancel call into the qube may take.
CANCEL_TIMEOUT = 10.0
_RUN_ID = re.compile(r"\A[A-Za-z0-9_.-]{1,64}\Z")
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")


def kill_script(marker: str) -> str:
    """A shell script that kills every process whose environment holds ``MARKER=<one of its
    arguments>``. Runs in the qube as root through VMExec (``sh -c SCRIPT NAME ID...``)."""
    return (
        'for id in "$@"; do for d in /proc/[0-9]*; do '
        f'if grep -qzx "{marker}=$id" "$d/environ" 2>/dev/null; '
        'then kill -KILL "${d#/proc/}" 2>/dev/null; fi; done; done; exit 0'
    )


#: Kills every process whose environment holds ``QMCP_RUN_ID=<one of the arguments>``.
CANCEL_SCRIPT = kill_script(RUN_MARKER)


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None  # None when the command was ended by the timeout
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    timed_out: bool
    run_id: str = ""

    @property
    def truncated(self) -> bool:
        return self.stdout_bytes > len(self.stdout) or self.stderr_bytes > len(self.stderr)


def new_run_id() -> str:
    return secrets.token_hex(8)


def encode_vmexec(words: list[str]) -> str:
    """``qubes.VMExec`` argument for ``words``: ``+`` between words; in a word, bytes outside
    ``[A-Za-z0-9_.]`` become ``-XX`` (upper-case hex) and ``-`` becomes ``--``."""
    out = []
    for word in words:
        raw = word.encode("utf-8", errors="surrogateescape")
        out.append(
            "".join(chr(b) if b in _PLAIN else "--" if b == 0x2D else f"-{b:02X}" for b in raw)
        )
    return "+".join(out)


def qrexec_client_argv(qrexec_client: Path, qube: str, words: list[str], user: str) -> list[str]:
    """``qrexec-client -d QUBE USER:QUBESRPC qubes.VMExec+<words> dom0``."""
    service = f"qubes.VMExec+{encode_vmexec(words)}"
    return [str(qrexec_client), "-d", qube, f"{user}:QUBESRPC {service} dom0"]


def wrapped_command(argv: list[str], run_id: str, timeout: float) -> list[str]:
    """``argv`` marked with the run id and bounded by ``timeout`` inside the qube."""
    if not _RUN_ID.match(run_id):
        raise ValueError("invalid run id")
    seconds = max(1, int(timeout))
    return [
        "env",
        f"{RUN_MARKER}={run_id}",
        "timeout",
        "--signal=TERM",
        f"--kill-after={KILL_AFTER}",
        str(seconds),
        *argv,
    ]


def run_argv(
    qrexec_client: Path, qube: str, argv: list[str], *, run_id: str, timeout: float, user: str
) -> list[str]:
    """The full dom0 command line of one bounded, marked run."""
    return qrexec_client_argv(qrexec_client, qube, wrapped_command(argv, run_id, timeout), user)


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


def _kill_local(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def cancel_in_qube(
    qrexec_client: Path, qube: str, run_ids: list[str], *, timeout: float = CANCEL_TIMEOUT
) -> bool:
    """Kill, inside ``qube``, every process of the runs ``run_ids`` (as root). True when the
    qube answered; never raises (it runs on shutdown and recovery paths)."""
    ids = [r for r in run_ids if _RUN_ID.match(r)]
    if not ids:
        return True
    argv = qrexec_client_argv(
        qrexec_client, qube, ["sh", "-c", CANCEL_SCRIPT, "qmcp-cancel", *ids], "root"
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return False
    try:
        return await asyncio.wait_for(proc.wait(), timeout) == 0
    except (TimeoutError, asyncio.CancelledError):
        _kill_local(proc)
        return False


async def run_command(
    qrexec_client: Path,
    qube: str,
    argv: list[str],
    *,
    stdin: bytes,
    timeout: float,
    limit: int,
    user: str = "root",
    run_id: str | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run ``argv`` in ``qube`` bounded by ``timeout`` there, relay bytes, enforce the caps.

    If the task is cancelled (the gate stops), the command is killed in the qube before the
    cancellation goes on.
    """
    run_id = run_id or new_run_id()
    full = run_argv(qrexec_client, qube, argv, run_id=run_id, timeout=timeout, user=user)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *full,
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
    timed_out = False
    try:
        code = await asyncio.wait_for(proc.wait(), max(1, int(timeout)) + KILL_AFTER + DOM0_MARGIN)
    except TimeoutError:
        # the qube did not end it (paused, wedged): end it there, and the line here
        _kill_local(proc)
        await cancel_in_qube(qrexec_client, qube, [run_id])
        await proc.wait()
        code, timed_out = None, True
    except asyncio.CancelledError:
        _kill_local(proc)
        feeder.cancel()
        out_task.cancel()
        err_task.cancel()
        await asyncio.shield(cancel_in_qube(qrexec_client, qube, [run_id]))
        raise
    if code in (124, 137) and time.monotonic() - started >= max(1, int(timeout)):
        code, timed_out = None, True  # ``timeout`` ended it in the qube
    # the line is gone, so the pipes close; bound the wait anyway
    done, pending = await asyncio.wait({feeder, out_task, err_task}, timeout=10)
    for task in pending:
        task.cancel()
    out, out_n = out_task.result() if out_task in done else (b"", 0)
    err, err_n = err_task.result() if err_task in done else (b"", 0)
    return RunResult(code, out, err, out_n, err_n, timed_out, run_id)
