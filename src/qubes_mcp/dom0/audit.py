"""The gate's tamper-evident audit log: one hash-chained JSON line per state-changing request.

Usage::

    log = AuditLog(Path("/var/log/qubes-mcp/audit.log"))
    log.append(principal="work-agent", op="qmcp.Start", targets=["work-web"],
               decision="allowed", outcome="ok", request_id=rid)

Append is O(1). The tail (seq, hash) lives in memory and is trusted only while the anchor
file still says the same and the current file still has the (device, inode, size) this
instance left it at. Otherwise — another process wrote or rotated, or someone edited — the
tail is re-read: the anchor (≤ 1 KiB) and the last line of the current file
(≤ ``MAX_LINE_BYTES``), never the whole file. Each append writes the line with ``O_APPEND``,
fsyncs it, then replaces the anchor (temp file, fsync, rename, fsync directory).

The anchor is what makes the end of the chain tamper-evident: after a truncated tail, a
deleted current file, or a last line forged with a recomputed hash the chain no longer ends
at the anchored (seq, hash). It is also why append refuses rather than guesses when the file
end and the anchor disagree — even after a crash (a torn last line, or a line written but not
yet anchored); :meth:`AuditLog.recover` is the operator's explicit, logged way out. A failed
append raises :class:`AuditError`, an ``unavailable`` refusal: the gate never performs a state
change it could not record. See docs/audit-log.md for the format and the threat analysis.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, TypeVar

from .audit_files import (
    OPEN_FLAGS,
    AuditError,
    ReadCounter,
    anchor_path,
    archive_path,
    archives,
    check_private,
    first_record,
    fsync_dir,
    last_line,
    lock_path,
    read_anchor,
    write_anchor,
)
from .audit_record import (
    GENESIS,
    MAX_LINE_BYTES,
    Anchor,
    AuditRecord,
    RecordError,
    RecordFields,
    build_record,
    parse_line,
    utc_stamp,
)

if TYPE_CHECKING:
    from .audit_verify import VerifyResult

__all__ = ["AuditError", "AuditLog", "AuditRecord"]

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
DEFAULT_KEEP: Final = 10
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Tail:
    anchor: Anchor
    file_id: tuple[int, int, int]  # (st_dev, st_ino, st_size) of the current file


class AuditLog:
    """Append-only, hash-chained, rotated audit log; thread- and process-safe.

    Args:
        path: the current log file; its directory (0700) holds everything else.
        max_bytes: rotate before a line would make the current file larger than this.
        keep: rotated files to retain besides the current one.
        clock: POSIX time source, read once per record.
        create: start a new chain when no log exists yet. A daemon whose log was created at
            install time passes ``False``, so that deleting every file, anchor included,
            makes appends fail instead of silently starting again at seq 1.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> None:
        if max_bytes < 2 * MAX_LINE_BYTES:
            raise ValueError(f"max_bytes must be at least {2 * MAX_LINE_BYTES}")
        if keep < 0:
            raise ValueError("keep must not be negative")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        #: bytes this instance has read from disk (tests prove append cost is O(1) with it)
        self.reads = ReadCounter()
        self._clock = clock
        self._create = create
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._tail: _Tail | None = None

    # --- public API -------------------------------------------------------------------------

    def append(
        self,
        *,
        principal: object,
        op: object,
        decision: str,
        outcome: str,
        targets: Iterable[object] | str | bytes = (),
        code: object = "",
        request_id: object = "",
        detail: Mapping[str, object] | None = None,
    ) -> AuditRecord:
        """Record one request durably (written and fsynced) and return the record.

        Values are tamed (escaped, capped, ``detail`` allowlisted) by audit_clean.py, so a
        caller may pass what the agent sent.

        Raises:
            AuditError: the request is not recorded and must be refused: an I/O error, or
                the end of the log is not what its anchor says (torn line, unanchored line,
                truncation, edit). If the failure came after the line was written (anchor
                update failed), that line is left unanchored and later appends refuse too,
                until the operator runs ``recover``.
            ValueError: ``decision`` or ``outcome`` is not one of the fixed words (a bug);
                nothing is written.
        """
        fields: RecordFields = {
            "principal": principal,
            "op": op,
            "decision": decision,
            "outcome": outcome,
            "targets": targets,
            "code": code,
            "request_id": request_id,
            "detail": detail,
        }
        with self._locked():
            return self._append_locked(fields)

    def verify(self) -> VerifyResult:
        """Check every retained file against the chain and the anchor (audit_verify.py)."""
        from .audit_verify import verify_log

        return verify_log(self.path)

    def recover(self, *, reason: str = "") -> AuditRecord:
        """Operator action: repair only a crash signature, then record the repair.

        A torn last line is moved to ``<log>.torn-<seq>`` and cut off; a last record that is
        valid and chained but not yet anchored is anchored. The ``audit.recover`` record
        appended afterwards names both (fragment size and digest), so the repair is itself
        in the chain.

        Raises:
            AuditError: the end of the log matches no crash signature (an edit, a
                truncation, a missing anchor): that is for a human to investigate.
        """
        from .audit_repair import repair_tail

        with self._locked():
            self._tail = None
            facts = self._guard(lambda: repair_tail(self.path, self.reads))
            return self._append_locked(
                RecordFields(
                    principal="dom0",
                    op="audit.recover",
                    decision="allowed",
                    outcome="ok",
                    detail={**facts, "reason": reason},
                )
            )

    def close(self) -> None:
        """Release the lock file; the log may still be used (it reopens it)."""
        with self._thread_lock:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._tail = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- locking and error mapping ------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the thread lock, then the flock shared with other processes."""
        with self._thread_lock:
            try:
                if self._lock_fd is None:
                    self._ensure_directory()
                    self._lock_fd = os.open(
                        lock_path(self.path), os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o600
                    )
                # Blocks while another process appends: one write, two fsyncs, one rename.
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            except OSError as err:
                raise AuditError(f"audit log {self.path}: cannot lock: {err}") from err
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _guard(self, action: Callable[[], _T]) -> _T:
        """Run ``action``; any failure forgets the cached tail and becomes an AuditError."""
        try:
            return action()
        except AuditError:
            self._tail = None
            raise
        except (OSError, RecordError) as err:
            self._tail = None
            raise AuditError(f"audit log {self.path}: {err}") from err

    def _ensure_directory(self) -> None:
        """Create the directory 0700 when allowed; refuse one that anybody else can read."""
        directory = self.path.parent
        if self._create and not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        check_private(os.stat(directory), directory)

    # --- the append path (lock held) ----------------------------------------------------------

    def _append_locked(self, fields: RecordFields) -> AuditRecord:
        return self._guard(lambda: self._write_record(fields))

    def _write_record(self, fields: RecordFields) -> AuditRecord:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | OPEN_FLAGS, 0o600)
        try:
            tail = self._sync_tail(fd)
            record = build_record(
                seq=tail.anchor.seq + 1,
                prev=tail.anchor.hash,
                ts=utc_stamp(self._clock()),
                **fields,
            )
            line = record.line()
            size = tail.file_id[2]
            base = (tail.anchor.base_seq, tail.anchor.base_prev)
            if size > 0 and size + len(line) > self.max_bytes:
                fd, base = self._rotate(fd, tail.anchor)
                size = 0
            written = os.write(fd, line)
            if written != len(line):
                raise AuditError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
            if size == 0:
                fsync_dir(self.path.parent)  # a new file must survive a crash with its line
            anchor = Anchor(record.seq, record.hash, *base)
            write_anchor(self.path, anchor)
            st = os.fstat(fd)
            self._tail = _Tail(anchor, (st.st_dev, st.st_ino, st.st_size))
            return record
        finally:
            os.close(fd)

    def _sync_tail(self, fd: int) -> _Tail:
        """The (seq, hash) to chain onto, proven against the anchor and the file's end."""
        st = os.fstat(fd)
        file_id = (st.st_dev, st.st_ino, st.st_size)
        anchor = read_anchor(self.path, self.reads)
        cached = self._tail
        if cached is not None and cached.anchor == anchor and cached.file_id == file_id:
            return cached
        # Slow path, still O(1): another writer, a rotation, an edit, or our first append.
        check_private(st, self.path)
        if anchor is None:
            if st.st_size > 0 or archives(self.path):
                raise AuditError(
                    f"anchor file {anchor_path(self.path)} is missing but the log exists; "
                    "run `qubes-mcp-admin audit verify` and investigate"
                )
            if not self._create:
                raise AuditError(f"no audit log at {self.path} and create=False")
            anchor = Anchor(0, GENESIS)
            write_anchor(self.path, anchor)
        if st.st_size > 0:
            untrusted_line = last_line(fd, st.st_size, self.reads, self.path)
            try:
                record = parse_line(untrusted_line)
            except RecordError as err:
                raise AuditError(
                    f"{self.path}: the last line is not a valid record ({err}); "
                    "refusing to chain onto it"
                ) from err
            if (record.seq, record.hash) != (anchor.seq, anchor.hash):
                if record.seq == anchor.seq + 1 and record.prev == anchor.hash:
                    raise AuditError(
                        f"{self.path}: the last record (seq {record.seq}) is not anchored "
                        "(a crash between append and anchor update, or an appended line); "
                        "check it, then run `qubes-mcp-admin audit recover`"
                    )
                raise AuditError(
                    f"{self.path}: the log ends at seq {record.seq} but its anchor records "
                    f"seq {anchor.seq}: it was edited or truncated"
                )
        return _Tail(anchor, file_id)

    # --- rotation -----------------------------------------------------------------------------

    def _rotate(self, fd: int, anchor: Anchor) -> tuple[int, tuple[int, str]]:
        """Archive the current file, start an empty one, prune; return (new fd, base)."""
        first = first_record(fd, self.reads, self.path)
        target = archive_path(self.path, first.seq)
        if target.exists():
            raise AuditError(f"cannot rotate: {target} already exists")
        os.rename(self.path, target)
        os.close(fd)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | OPEN_FLAGS
        new_fd = os.open(self.path, flags, 0o600)
        try:
            fsync_dir(self.path.parent)
            return new_fd, self._prune(anchor)
        except BaseException:
            os.close(new_fd)
            raise

    def _prune(self, anchor: Anchor) -> tuple[int, str]:
        """Delete archives beyond ``keep``: the anchor's base moves first, then files go."""
        found = archives(self.path)
        excess = len(found) - self.keep
        if excess <= 0:
            return anchor.base_seq, anchor.base_prev
        if self.keep == 0:
            base = (anchor.seq + 1, anchor.hash)
        else:
            oldest = found[excess][1]
            ofd = os.open(oldest, os.O_RDONLY | OPEN_FLAGS)
            try:
                record = first_record(ofd, self.reads, oldest)
            finally:
                os.close(ofd)
            base = (record.seq, record.prev)
        # Anchor first: a crash here leaves extra old files (verify accepts files older than
        # the base when they chain into it), never a base pointing at a deleted file.
        write_anchor(self.path, Anchor(anchor.seq, anchor.hash, *base))
        for _seq, old in found[:excess]:
            old.unlink()
        fsync_dir(self.path.parent)
        return base
