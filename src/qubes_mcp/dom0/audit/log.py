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
fsyncs it, then replaces the anchor (temp file, fsync, rename, fsync directory). The line and
its anchor are one unit: if anything fails before the rename (a full disk, a read-only file
system), the line is cut off again, so the log never holds a line its anchor does not vouch
for and the next append needs no repair.

Rotation deletes old files only when every record in them is at or before the operator's
export checkpoint (``audit checkpoint``, operator/audit_cli.py); when the retained space is full of
unexported records, new requests are refused instead of old records forgotten.

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
from typing import Final, TypeVar

from qubes_mcp.dom0.audit.files import (
    OPEN_FLAGS,
    AuditError,
    ReadCounter,
    anchor_path,
    archive_path,
    archives,
    chain_exists,
    check_private,
    exported_path,
    first_record,
    fsync_dir,
    last_line,
    lock_path,
    publish_anchor,
    read_anchor,
    read_exported,
    stage_anchor,
    write_anchor,
)
from qubes_mcp.dom0.audit.record import (
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
from qubes_mcp.dom0.audit.repair import repair_tail
from qubes_mcp.dom0.audit.verify import VerifyResult, verify_log

__all__ = ["AuditError", "AuditLog", "AuditRecord", "chain_exists"]

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
        keep: rotated files to retain besides the current one; beyond it, only files wholly
            before the export checkpoint are deleted, and otherwise appends that would
            start something are refused.
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

        Values are tamed (escaped, capped, ``detail`` allowlisted) by audit/clean.py, so a
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
        """Check every retained file against the chain and the anchor (audit/verify.py)."""
        return verify_log(self.path)

    def recover(self, *, reason: str = "", accept_loss: bool = False) -> AuditRecord:
        """Operator action: repair only a crash signature, then record the repair.

        A torn last line is moved to ``<log>.torn-<seq>`` and cut off; a last record that is
        valid and chained but not yet anchored is anchored. The ``audit.recover`` record
        appended afterwards names both (fragment size and digest), so the repair is itself
        in the chain. With ``accept_loss`` a torn line that is the anchored record itself is
        cut too, and the chain is re-anchored one record back; ``lost_seq``/``lost_hash`` in
        the recover record name what was lost.

        Raises:
            AuditError: the end of the log matches no crash signature (an edit, a
                truncation, a missing anchor): that is for a human to investigate.
        """
        with self._locked():
            self._tail = None
            facts = self._guard(lambda: repair_tail(self.path, self.reads, accept_loss=accept_loss))
            return self._append_locked(
                RecordFields(
                    principal="dom0",
                    op="audit.recover",
                    decision="allowed",
                    outcome="ok",
                    detail={**facts, "reason": reason},
                )
            )

    def checkpoint(self, *, seq: int, digest: str, reason: str = "") -> AuditRecord:
        """Operator action: records through (``seq``, ``digest``) are exported (backed up).

        The caller proves first that the record is in the intact chain (operator/audit_cli.py
        runs verify with it as a checkpoint). Rotation may then delete rotated files whose
        records all precede it, never a later one. The checkpoint is recorded in the chain.
        """
        with self._locked():
            self._guard(
                lambda: write_anchor(self.path, Anchor(seq, digest), file=exported_path(self.path))
            )
            return self._append_locked(
                RecordFields(
                    principal="dom0",
                    op="audit.checkpoint",
                    decision="allowed",
                    outcome="ok",
                    detail={"exported_seq": seq, "reason": reason},
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

    def _open_current(self) -> int:
        """Open the current file for appending; create it only where a chain may continue.

        A refused append must leave nothing behind: with no anchor and ``create=False`` there
        is no chain to continue, and an empty ``audit.log`` created here would only stand in
        the way of ``install`` starting one.
        """
        flags = os.O_RDWR | os.O_APPEND | OPEN_FLAGS
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            pass
        if not self._create and read_anchor(self.path, self.reads) is None:
            raise AuditError(f"no audit log at {self.path} and create=False")
        # The chain is new (create=True), or a rotation was interrupted between the rename
        # and the new file; _sync_tail checks the end of the chain either way.
        return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)

    def _write_record(self, fields: RecordFields) -> AuditRecord:
        fd = self._open_current()
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
                blocked = self._retention_blocked(fd, tail.anchor)
                if blocked is None:
                    fd, base = self._rotate(fd, tail.anchor)
                    size = 0
                elif not _must_record(fields):
                    raise AuditError(blocked)
                # else: the outcome of a request already under way (or an operator's
                # record) is written past max_bytes rather than lost; the pending lines
                # that could need one are bounded by the gate's concurrency.
            anchor = Anchor(record.seq, record.hash, *base)
            self._commit(fd, size, line, anchor)
            st = os.fstat(fd)
            self._tail = _Tail(anchor, (st.st_dev, st.st_ino, st.st_size))
            return record
        finally:
            os.close(fd)

    def _commit(self, fd: int, size: int, line: bytes, anchor: Anchor) -> None:
        """Write ``line`` and its anchor as one unit: both durable, or the line cut off again.

        A full disk or an I/O error anywhere before the new anchor is in place truncates the
        file back to ``size``, so the log never holds a line (an ``allowed/pending`` claim)
        that its anchor does not vouch for, and the next append needs no ``recover``. Only if
        that truncation fails too is a torn or unanchored tail left for the operator.
        """
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise AuditError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(fd)
            if size == 0:
                fsync_dir(self.path.parent)  # a new file must survive a crash with its line
            staged = stage_anchor(self.path, anchor)
        except BaseException as err:
            self._cut_back(fd, size, err)
            raise
        # The rename is the commit point: from here the anchor names the line. A failure
        # while making the rename durable leaves both in place; the caller still refuses,
        # and the gate's refusal line then closes the request truthfully.
        publish_anchor(self.path, staged)

    def _cut_back(self, fd: int, size: int, cause: BaseException) -> None:
        """Remove what a failed append wrote; say so precisely if even that fails."""
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        except OSError as err:
            raise AuditError(
                f"{self.path}: an append failed ({cause}) and its partial line could not be "
                f"removed ({err}); check with `qubes-mcp-admin audit verify`, then run "
                "`qubes-mcp-admin audit recover`"
            ) from err

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

    def _retention_blocked(self, fd: int, anchor: Anchor) -> str | None:
        """Why rotating now would have to delete records not yet exported, or ``None``.

        After the rotation the current file (records up to ``anchor.seq``) is one more
        rotated file; pruning may delete only files whose every record is at or before the
        operator's export checkpoint (``audit checkpoint``). Retention never forgets
        unexported records: when it would have to, the log refuses new requests instead.
        """
        firsts = [seq for seq, _ in archives(self.path)]
        excess = len(firsts) + 1 - self.keep
        if excess <= 0:
            return None
        firsts.append(first_record(fd, self.reads, self.path).seq)
        exported = read_exported(self.path, self.reads)
        if _exported_files(firsts, anchor.seq, exported) >= excess:
            return None
        since = f"after seq {exported.seq}" if exported else "(none was ever exported)"
        return (
            f"audit log {self.path}: the retained space is full ({self.keep} rotated files of "
            f"{self.max_bytes} bytes) and rotating would delete records not yet exported "
            f"{since}; back up the log, then run `qubes-mcp-admin audit checkpoint`"
        )

    def _prune(self, anchor: Anchor) -> tuple[int, str]:
        """Delete exported archives beyond ``keep``; the anchor's base moves first, then files."""
        found = archives(self.path)
        exported = read_exported(self.path, self.reads)
        deletable = _exported_files([seq for seq, _ in found], anchor.seq, exported)
        excess = min(len(found) - self.keep, deletable)
        if excess <= 0:
            return anchor.base_seq, anchor.base_prev
        if excess == len(found):
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


def _must_record(fields: RecordFields) -> bool:
    """An outcome of a request already acting, or an operator's own record: never refused for
    want of retained space (refusing it would leave a ``pending`` line without an outcome)."""
    return fields["decision"] == "allowed" and fields["outcome"] != "pending"


def _exported_files(firsts: list[int], last_seq: int, exported: Anchor | None) -> int:
    """How many of the files (by first seq, oldest first; the newest ends at ``last_seq``),
    counted from the oldest, hold only records the operator has exported."""
    if exported is None:
        return 0
    count = 0
    for index in range(len(firsts)):
        ends = firsts[index + 1] - 1 if index + 1 < len(firsts) else last_seq
        if ends > exported.seq:
            break
        count += 1
    return count
