"""A relayed copy with a hostile end: the source runs its own sender, or the destination its
own receiver (root in an AppVM can replace ``/usr/lib/qubes/qfile-*`` until the next boot).

dom0's relay (``dom0/copy.py``) must still hold: nothing lands outside
``~/QubesIncoming/<source>/`` (named by dom0), nothing above a cap reaches the receiver, a
malformed stream or an endless one stops, and a receiver's false "done" is not believed.
The halves run in real emulated qubes over the configured ``qvm-run``.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.dom0.copy import (
    QFILE_AGENT,
    QFILE_UNPACKER,
    CopyLimits,
    CopyOutcome,
    failure_message,
    relay_copy,
)
from qubes_mcp.stack import Stack, start_stack

pytestmark = pytest.mark.bwrap

HDR = struct.Struct("<IIQIIII")
REG, DIR = 0o100644, 0o040755
INCOMING = "/home/user/QubesIncoming/ai-dev"
LIMITS = CopyLimits(max_bytes=1 << 20, max_files=50, timeout=20)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("hostile") / "root")
    try:
        yield s
    finally:
        s.stop()


def qvm_run_argv(qvm_run: Path, qube: str, argv: list[str], *, user: str = "root") -> list[str]:
    """The emulated dom0's ``qvm-run`` (it starts the qube, like the real one): here the two
    hostile halves are driven directly, not through the gate."""
    return [str(qvm_run), "--pass-io", "--no-gui", "--user", user, "--no-shell", "--", qube, *argv]


def sh(stack: Stack, qube: str, script: str, user: str = "user") -> str:
    argv = qvm_run_argv(stack.root / "usr/bin/qvm-run", qube, ["sh", "-c", script], user=user)
    return subprocess.run(argv, capture_output=True, timeout=60, check=False).stdout.decode()


def entry(name: bytes, mode: int, content: bytes = b"", filelen: int | None = None) -> bytes:
    size = len(content) if filelen is None else filelen
    return HDR.pack(len(name) + 1, mode, size, 0, 0, 0, 0) + name + b"\0" + content


END = HDR.pack(0, 0, 0, 0, 0, 0, 0)


def hostile_sender(stack: Stack, stream: bytes, *, then: str = "") -> list[str]:
    """A sender in ai-dev that writes ``stream`` verbatim, then reads the answer."""
    code = (
        "import sys,os\n"
        f"sys.stdout.buffer.write({stream!r}); sys.stdout.buffer.flush()\n"
        f"{then}\n"
        "sys.stdin.buffer.read()\n"
    )
    return qvm_run_argv(stack.root / "usr/bin/qvm-run", "ai-dev", ["/usr/bin/python3", "-c", code])


def receiver(stack: Stack) -> list[str]:
    sh(stack, "ai-build", f"mkdir -p -m 0700 /home/user/QubesIncoming {INCOMING}")
    return qvm_run_argv(
        stack.root / "usr/bin/qvm-run", "ai-build", [QFILE_UNPACKER, "1000", INCOMING], user="user"
    )


def relay(
    stack: Stack, sender: list[str], recv: list[str], limits: CopyLimits = LIMITS
) -> CopyOutcome:
    return asyncio.run(relay_copy(sender, recv, limits))


@pytest.mark.parametrize(
    "name",
    [b"../escape", b"../../escape", b"/home/user/escape", b"../ai-build/escape", b"a/../../escape"],
)
def test_a_sender_cannot_place_files_outside_its_incoming_directory(
    stack: Stack, name: bytes
) -> None:
    out = relay(stack, hostile_sender(stack, entry(name, REG, b"pwned") + END), receiver(stack))
    assert failure_message(out, LIMITS) is not None
    found = sh(stack, "ai-build", "find /home/user -name escape")
    assert found == ""


def test_an_announced_size_above_the_cap_is_refused_before_any_byte(stack: Stack) -> None:
    stream = entry(b"huge", REG, b"x" * 100, filelen=10 << 30)
    out = relay(stack, hostile_sender(stack, stream), receiver(stack))
    assert out.aborted == "bytes" and out.stream_bytes == 0
    assert sh(stack, "ai-build", f"ls {INCOMING}/huge 2>/dev/null; true") == ""


def test_an_endless_list_of_files_stops_at_the_file_cap(stack: Stack) -> None:
    stream = b"".join(entry(f"many{i}".encode(), REG, b"") for i in range(200)) + END
    out = relay(stack, hostile_sender(stack, stream), receiver(stack))
    assert (out.aborted, out.files) == ("files", LIMITS.max_files)
    landed = sh(stack, "ai-build", f"ls {INCOMING} | grep -c '^many' || true")
    assert int(landed) == LIMITS.max_files


@pytest.mark.parametrize(
    "stream",
    [
        entry(b"fifo", 0o010644) + END,
        END + b"more after the end",
        HDR.pack(1 << 20, REG, 0, 0, 0, 0, 0),
    ],
    ids=["fifo", "after-end", "long-name"],
)
def test_a_malformed_stream_is_stopped(stack: Stack, stream: bytes) -> None:
    out = relay(stack, hostile_sender(stack, stream), receiver(stack))
    assert out.aborted == "protocol"
    assert failure_message(out, LIMITS) == (
        "the source qube sent a malformed stream; the copy was stopped"
    )


def test_a_sender_that_never_finishes_is_cut_at_the_timeout(stack: Stack) -> None:
    quick = CopyLimits(max_bytes=1 << 20, max_files=50, timeout=3)
    sender = hostile_sender(
        stack, entry(b"slow", REG, b"ab", filelen=10), then="import time; time.sleep(60)"
    )
    out = relay(stack, sender, receiver(stack), quick)
    assert out.aborted == "timeout"


def test_a_sender_that_lingers_after_the_answer_does_not_turn_a_landed_copy_into_a_failure(
    stack: Stack,
) -> None:
    stream = entry(b"lingered.txt", REG, b"landed\n") + END
    sender = hostile_sender(stack, stream, then="import time; time.sleep(60)")
    started = time.monotonic()
    out = relay(stack, sender, receiver(stack))
    assert out.ok and (out.files, out.content_bytes) == (1, 7)
    assert time.monotonic() - started < LIMITS.timeout
    assert sh(stack, "ai-build", f"cat {INCOMING}/lingered.txt") == "landed\n"


def test_a_sender_sending_after_the_answer_is_a_malformed_stream(stack: Stack) -> None:
    stream = entry(b"late.txt", REG, b"x") + END
    after = "import time; time.sleep(1); sys.stdout.buffer.write(b'late'); sys.stdout.flush()"
    sender = hostile_sender(stack, stream, then=after)
    out = relay(stack, sender, receiver(stack))
    assert out.aborted == "protocol" and out.files == 1


def test_a_receiver_that_says_done_without_reading_is_not_believed(stack: Stack) -> None:
    sh(stack, "ai-dev", "echo real > /home/user/liar.txt")
    liar = qvm_run_argv(
        stack.root / "usr/bin/qvm-run",
        "ai-build",
        ["/usr/bin/python3", "-c", "import sys; sys.stdout.buffer.write(bytes(16))"],
    )
    sender = qvm_run_argv(
        stack.root / "usr/bin/qvm-run", "ai-dev", [QFILE_AGENT, "--", "/home/user/liar.txt"]
    )
    out = relay(stack, sender, liar)
    assert not out.ok
    assert failure_message(out, LIMITS) is not None


def test_a_receiver_flooding_its_answer_is_bounded(stack: Stack) -> None:
    """Megabytes where a 16-byte answer belongs: dom0 keeps one answer's worth, forwards no
    more to the sender, and does not take the zeros for a confirmation."""
    sh(stack, "ai-dev", "echo x > /home/user/flood.txt")
    flood = qvm_run_argv(
        stack.root / "usr/bin/qvm-run", "ai-build", ["head", "-c", "4000000", "/dev/zero"]
    )
    sender = qvm_run_argv(
        stack.root / "usr/bin/qvm-run", "ai-dev", [QFILE_AGENT, "--", "/home/user/flood.txt"]
    )
    out = relay(stack, sender, flood)
    assert not out.ok and out.answer is not None and out.answer.crc == 0
    assert failure_message(out, LIMITS) == (
        "the copy failed: the destination received different bytes than were sent"
    )
