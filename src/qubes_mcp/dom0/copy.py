"""A copy between two qubes, relayed by dom0: the gate moves the bytes, no qube calls another.

Qubes' own ``qvm-copy`` has the source qube call ``qubes.Filecopy`` in the destination, which
needs policy lines letting one qube start services in another; any code in the source could
then push files on its own, with no gate decision. Here dom0 starts both halves of the same
protocol itself, each over its own line to its qube:

- the sender, ``/usr/lib/qubes/qfile-agent -- PATH…`` in the source (writes the qfile stream on
  stdout, reads the receiver's answer on stdin);
- the receiver, ``/usr/lib/qubes/qfile-unpacker UID DIR`` in the destination, with DIR
  ``~user/QubesIncoming/<source>`` named by dom0 — the sender has no say in where files land or
  which source they are filed under (what ``QREXEC_REMOTE_DOMAIN`` gives the real service);

and joins them: sender stdout → receiver stdin, receiver stdout (its answer) → sender stdin.

The qfile stream (qubes-linux-utils ``libqubes-rpc-filecopy.h``): per entry a 32-byte
little-endian header (namelen u32, mode u32, filelen u64, four u32 times), ``namelen`` bytes of
name, then ``filelen`` bytes for a regular file or a symlink and none for a directory; a header
with ``namelen == 0`` ends it. :class:`StreamMeter` follows exactly that framing — the one the
receiver reads — so dom0 counts what will land, and refuses the header that would cross the
operator's byte or file cap *before* forwarding it: nothing above a cap reaches the receiver.
An entry of any other type, a name longer than the receiver accepts, or data after the end
marker is a protocol violation and aborts the copy too. dom0 keeps the CRC-32 of what it
forwarded and compares it with the receiver's, so a copy counts as done only when the receiver
confirms every byte dom0 sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import os
import signal
import stat
import struct
import zlib
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

QFILE_AGENT = "/usr/lib/qubes/qfile-agent"
QFILE_UNPACKER = "/usr/lib/qubes/qfile-unpacker"
#: the incoming directory as the real receiver names it, under the receiving user's home
INCOMING_DIR_NAME = "QubesIncoming"
#: Qubes' default user in every qube, and its uid (qfile-unpacker's first argument)
QUBE_USER = "user"
QUBE_USER_HOME = "/home/user"
QUBE_USER_UID = 1000

FILE_HEADER = struct.Struct("<IIQIIII")
RESULT_HEADER = struct.Struct("<IIQ")
RESULT_EXT = struct.Struct("<I")
#: the receiver refuses names (and link targets) of this many bytes or more
MAX_PATH_LENGTH = 16384
#: the receiver's answer: result header, extension, and at most one name
ANSWER_MAX = RESULT_HEADER.size + RESULT_EXT.size + MAX_PATH_LENGTH
#: what qfile-unpacker reports when the stream stopped mid-file
LEGAL_EOF = 31415926
_CHUNK = 65536
_STDERR_KEEP = 4096
#: after the receiver has answered, how long the sender may take to read it and exit
_SENDER_GRACE = 5.0


class CopyAbort(Exception):  # noqa: N818 - a decision, not a bug: the copy is stopped
    """The stream crossed a cap or broke the protocol; ``what`` says which, and ``usable`` how
    many bytes of the chunk being fed come before the offending entry (they may be forwarded:
    the receiver then keeps every entry before it)."""

    def __init__(self, what: str, usable: int = 0) -> None:
        super().__init__(what)
        self.what = what
        self.usable = usable


class StreamMeter:
    """Follows the qfile framing as the receiver will read it; refuses what crosses a cap."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes = max_bytes
        self.max_files = max_files
        #: regular files and symlinks announced, plus each directory the first time
        self.files = 0
        #: content bytes announced (file contents and link targets)
        self.bytes = 0
        self.ended = False
        self._dirs: set[bytes] = set()
        self._header = bytearray()
        self._name = bytearray()
        self._name_left = 0
        self._content_left = 0
        self._pending_dir = False
        self._pending_len = 0
        self._entry_start = 0
        self._headers = 0

    def feed(self, untrusted_data: bytes) -> None:
        """Account for ``untrusted_data``; raise :class:`CopyAbort` before anything too much."""
        try:
            self._feed(untrusted_data)
        except CopyAbort as abort:
            abort.usable = self._entry_start
            raise

    def _feed(self, untrusted_data: bytes) -> None:
        view = memoryview(untrusted_data)
        self._entry_start = 0
        while view:
            offset = len(untrusted_data) - len(view)
            if self.ended:
                raise CopyAbort("protocol")  # the receiver reads nothing after the end marker
            if self._content_left:
                step = min(self._content_left, len(view))
                self._content_left -= step
                view = view[step:]
            elif self._name_left:
                step = min(self._name_left, len(view))
                if self._pending_dir:
                    self._name += view[:step]
                self._name_left -= step
                view = view[step:]
                if not self._name_left:
                    self._entry_named()
            else:
                if not self._header:
                    self._entry_start = offset  # an entry's header begins here
                step = min(FILE_HEADER.size - len(self._header), len(view))
                self._header += view[:step]
                view = view[step:]
                if len(self._header) == FILE_HEADER.size:
                    self._parse_header(bytes(self._header))
                    self._header.clear()

    def _parse_header(self, raw: bytes) -> None:
        namelen, mode, filelen, *_times = FILE_HEADER.unpack(raw)
        if namelen == 0:
            self.ended = True
            return
        if namelen > MAX_PATH_LENGTH - 1:
            raise CopyAbort("protocol")
        # every entry is announced at most twice (a directory before and after its entries):
        # more headers than that is a sender repeating itself to keep dom0 busy
        self._headers += 1
        if self._headers > 2 * self.max_files:
            raise CopyAbort("files")
        kind = stat.S_IFMT(mode)
        self._pending_dir = kind == stat.S_IFDIR
        if kind in (stat.S_IFREG, stat.S_IFLNK):
            if kind == stat.S_IFLNK and filelen > MAX_PATH_LENGTH - 1:
                raise CopyAbort("protocol")
            if filelen > self.max_bytes - self.bytes:
                raise CopyAbort("bytes")
            self._count_file()
            self.bytes += filelen
            self._pending_len = filelen
        elif self._pending_dir:
            self._pending_len = 0  # the receiver reads no content for a directory
        else:
            raise CopyAbort("protocol")  # the receiver refuses every other type
        self._name.clear()
        self._name_left = namelen

    def _entry_named(self) -> None:
        if self._pending_dir:
            # a digest, not the name: at most ``max_files`` of them, 32 bytes each
            name = hashlib.sha256(bytes(self._name).split(b"\0", 1)[0]).digest()
            if name not in self._dirs:  # a directory is sent before and after its entries
                self._count_file()
                self._dirs.add(name)
        self._content_left = self._pending_len

    def _count_file(self) -> None:
        if self.files >= self.max_files:
            raise CopyAbort("files")
        self.files += 1


@dataclass(frozen=True)
class CopyLimits:
    """The operator's caps on one copy: ``[limits] copy_bytes``, ``copy_files``, ``run_timeout``."""

    max_bytes: int
    max_files: int
    timeout: float


@dataclass(frozen=True)
class Answer:
    """The receiver's answer (result header and, when sent, the last name)."""

    code: int
    crc: int


def parse_answer(untrusted_data: bytes) -> Answer | None:
    if len(untrusted_data) < RESULT_HEADER.size:
        return None
    code, _pad, crc = RESULT_HEADER.unpack_from(untrusted_data)
    return Answer(code, crc)


@dataclass(frozen=True)
class CopyOutcome:
    """What happened, for the audit log and for the reply."""

    files: int
    content_bytes: int
    stream_bytes: int
    ended: bool
    answer: Answer | None
    crc: int
    sender_exit: int | None
    receiver_exit: int | None
    #: "" when the copy ran to its end, else "bytes", "files", "protocol", "timeout", or
    #: "prepare" (the receiver never started)
    aborted: str
    sender_stderr: bytes
    receiver_stderr: bytes

    @property
    def ok(self) -> bool:
        return (
            not self.aborted
            and self.ended
            and self.answer is not None
            and self.answer.code == 0
            and self.answer.crc == self.crc
            and self.receiver_exit == 0
        )  # the sender's exit code is only its opinion: the receiver's answer is what landed


_RECEIVER_MESSAGES = {
    errno.EEXIST: "a file of that name is already in the destination's QubesIncoming directory",
    errno.EILSEQ: "a file name or link target has characters the destination refuses",
    errno.ENOLINK: "a symbolic link would point outside what was copied",
    errno.EDQUOT: "the destination refused the copy as too large",
    errno.ENOSPC: "the destination has no space left",
}


def failure_message(outcome: CopyOutcome, limits: CopyLimits) -> str | None:
    """The fixed message an agent sees for a failed copy, or ``None`` when it succeeded.

    Built from numbers and dom0's own wording only: the qubes' stderr never reaches the agent.
    """
    if outcome.ok:
        return None
    if outcome.aborted == "bytes":
        return f"the copy exceeds the operator's limit of {limits.max_bytes} bytes"
    if outcome.aborted == "files":
        return f"the copy exceeds the operator's limit of {limits.max_files} files"
    if outcome.aborted == "timeout":
        return f"the copy did not finish within {limits.timeout:g} seconds"
    if outcome.aborted == "prepare":
        return "the copy failed: the destination qube could not prepare its QubesIncoming directory"
    if outcome.aborted == "protocol":
        return "the source qube sent a malformed stream; the copy was stopped"
    answer = outcome.answer
    if answer is not None and answer.code not in (0, errno.EREMOTEIO, LEGAL_EOF):
        return "the copy failed: " + _RECEIVER_MESSAGES.get(
            answer.code, "the destination qube refused the files"
        )
    if not outcome.ended:
        return "the copy failed: a path does not exist or cannot be read in the source qube"
    if answer is None or answer.code or outcome.receiver_exit != 0:
        return "the copy failed: the destination qube did not confirm the files"
    return "the copy failed: the destination received different bytes than were sent"


def failure_reason(outcome: CopyOutcome) -> str:
    """What went wrong, for the audit log and the dom0 journal (structural facts only)."""
    answer = outcome.answer
    if outcome.aborted:
        return f"copy stopped: {outcome.aborted}"
    if answer is not None and answer.code:
        code = "LEGAL_EOF" if answer.code == LEGAL_EOF else errno.errorcode.get(answer.code)
        return f"copy refused by the receiver: {code or answer.code}"
    if not outcome.ended:
        return f"copy sender stopped before the end (exit {outcome.sender_exit})"
    if answer is None or outcome.receiver_exit != 0:
        return f"copy receiver gave no answer (exit {outcome.receiver_exit})"
    return "copy checksum mismatch"


async def _spawn(argv: Sequence[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # one process group each, killed as a whole
    )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
        writer.close()
        await writer.wait_closed()


async def _keep(stream: asyncio.StreamReader | None) -> bytes:
    kept = bytearray()
    if stream is None:
        return b""
    while chunk := await stream.read(_CHUNK):
        if len(kept) < _STDERR_KEEP:
            kept += chunk[: _STDERR_KEEP - len(kept)]
    return bytes(kept)


class _Relay:
    def __init__(
        self,
        sender: asyncio.subprocess.Process,
        receiver: asyncio.subprocess.Process,
        limits: CopyLimits,
    ) -> None:
        self.sender = sender
        self.receiver = receiver
        self.meter = StreamMeter(limits.max_bytes, limits.max_files)
        self.crc = 0
        self.stream_bytes = 0
        self.answer = bytearray()

    async def forward_stream(self) -> None:
        """Sender stdout → receiver stdin, metered; raises CopyAbort at a cap."""
        assert self.sender.stdout is not None and self.receiver.stdin is not None
        receiving = True
        while chunk := await self.sender.stdout.read(_CHUNK):
            if not receiving:
                continue  # the receiver has stopped reading; its answer says why
            try:
                self.meter.feed(chunk)
            except CopyAbort as abort:
                await self._forward(chunk[: abort.usable])
                raise
            receiving = await self._forward(chunk)
        await _close(self.receiver.stdin)

    async def _forward(self, chunk: bytes) -> bool:
        """Hand ``chunk`` to the receiver; ``False`` once it stopped reading."""
        assert self.receiver.stdin is not None
        self.crc = zlib.crc32(chunk, self.crc)
        self.stream_bytes += len(chunk)
        try:
            self.receiver.stdin.write(chunk)
            await self.receiver.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def forward_answer(self) -> None:
        """Receiver stdout (its answer, bounded) → sender stdin, then close it."""
        assert self.receiver.stdout is not None and self.sender.stdin is not None
        while chunk := await self.receiver.stdout.read(_CHUNK):
            room = ANSWER_MAX - len(self.answer)
            if room <= 0:
                continue
            chunk = chunk[:room]
            self.answer += chunk
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.sender.stdin.write(chunk)
                await self.sender.stdin.drain()
        await _close(self.sender.stdin)


async def relay_copy(
    sender_argv: Sequence[str],
    receiver_argv: Sequence[str],
    limits: CopyLimits,
    *,
    ready: Awaitable[bool] | None = None,
) -> CopyOutcome:
    """Run both halves and join their streams under ``limits``; never raises for the qubes'
    behaviour (a cap, a timeout, a malformed stream): that is in the outcome.

    ``ready``, when given, must come true before the receiver starts (the destination's
    directory being made); the sender starts meanwhile, so the two waits overlap — until the
    receiver runs, the sender is held by the pipe between them.
    """
    try:
        sender = await _spawn(sender_argv)
    except BaseException:
        if inspect.iscoroutine(ready):
            ready.close()  # never started: say so rather than leave it unawaited
        raise
    try:
        if ready is not None and not await ready:
            await _kill(sender)
            return CopyOutcome(0, 0, 0, False, None, 0, None, None, "prepare", b"", b"")
        receiver = await _spawn(receiver_argv)
    except BaseException:
        await _kill(sender)
        raise
    relay = _Relay(sender, receiver, limits)
    stream = asyncio.create_task(relay.forward_stream())
    answer = asyncio.create_task(relay.forward_answer())
    sender_err = asyncio.create_task(_keep(sender.stderr))
    receiver_err = asyncio.create_task(_keep(receiver.stderr))
    answered = asyncio.ensure_future(_answered(answer, receiver))
    aborted = ""
    try:
        async with asyncio.timeout(limits.timeout):
            # the receiver answers when the stream ends; the sender exits once it has read the
            # answer: whichever side finishes first, the other is then given a bounded wait
            await asyncio.wait({stream, answered}, return_when=asyncio.FIRST_COMPLETED)
            failure = stream.exception() if stream.done() else None
            if failure is not None and not isinstance(failure, CopyAbort):
                raise failure  # not the qubes' doing: the gate's fail-closed path reports it
            if isinstance(failure, CopyAbort):
                aborted = failure.what
                # the sender is stopped; the receiver keeps what came before the entry that
                # crossed the line, sees its input end without the end marker and stops too
                await _kill(sender)
                await _close(receiver.stdin)
                await answered
            else:
                await answered
                # the receiver has answered: a sender that does not finish soon is not waited for
                with contextlib.suppress(TimeoutError, CopyAbort):
                    await asyncio.wait_for(asyncio.shield(stream), _SENDER_GRACE)
                if stream.done() and isinstance(stream.exception(), CopyAbort):
                    aborted = "protocol"  # it kept sending after the end of the transfer
    except TimeoutError:
        aborted = aborted or "timeout"
    finally:
        await asyncio.gather(_kill(sender), _kill(receiver))
        tasks = {stream, answer, answered, sender_err, receiver_err}
        _done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        for task in tasks:  # retrieved, so an aborted stream is not reported as unhandled
            if task.done() and not task.cancelled():
                task.exception()
    sender_exit = sender.returncode if not aborted else None
    return CopyOutcome(
        files=relay.meter.files,
        content_bytes=relay.meter.bytes,
        stream_bytes=relay.stream_bytes,
        ended=relay.meter.ended,
        answer=parse_answer(bytes(relay.answer)),
        crc=relay.crc,
        sender_exit=sender_exit,
        receiver_exit=receiver.returncode if not aborted else None,
        aborted=aborted,
        sender_stderr=_result(sender_err),
        receiver_stderr=_result(receiver_err),
    )


async def _answered(answer: asyncio.Task[None], receiver: asyncio.subprocess.Process) -> None:
    await answer
    await receiver.wait()


def _result(task: asyncio.Task[bytes]) -> bytes:
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return b""
