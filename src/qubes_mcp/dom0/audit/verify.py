"""Walking the whole audit log: every retained file, every line, the chain, the anchor.

:func:`verify_log` reads the rotated files oldest first, then the current file, and checks
each line with :func:`~qubes_mcp.dom0.audit.record.parse_line` (canonical bytes, hash) and
its place in the chain (``seq`` one more, ``prev`` the previous ``hash``), across files.
Then the ends:

- the start: the first record may be older than the anchor's ``base_seq`` (rotated files
  awaiting deletion), never newer — a newer start means retained files were deleted;
- the end: the last record must be exactly the anchored (seq, hash). One more, chained,
  is an *unanchored* record (crash window, or a line added behind the gate's back); fewer
  is a *truncated* tail; the same seq with another hash is a *forged* end.

It stops at the first problem and names the file and line. It takes the writers' lock
shared, so a verify sees a consistent log (appends wait for it; it is an operator action).

It also reports the requests whose last line is ``pending`` (dom0/journal.py): in flight
while the gate runs, or cut off by a stop that start-up recovery has not yet closed. They do
not make the log broken — the chain is intact — but the operator is told.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qubes_mcp.dom0.audit.files import (
    OPEN_FLAGS,
    AuditError,
    ReadCounter,
    anchor_path,
    archives,
    check_private,
    lock_path,
    read_anchor,
)
from qubes_mcp.dom0.audit.record import MAX_LINE_BYTES, Anchor, AuditRecord, RecordError, parse_line
from qubes_mcp.dom0.journal import OpenRequests

#: at most this many requests without an outcome are listed by ``audit verify``
UNFINISHED_SHOWN = 20

#: ``VerifyResult.kind`` values, one per distinct way a log can be broken
KINDS = (
    "missing",  # no log at all (exit 2)
    "unreadable",  # an OSError, e.g. not root (exit 2)
    "permissions",  # a file or the directory is readable by someone else
    "anchor",  # the anchor file is missing or malformed
    "corrupt",  # a line is not a valid record: edited, or garbage
    "chain",  # seq/prev do not follow: a line deleted, reordered or inserted
    "retention",  # retained files deleted from the old end
    "torn",  # the very last line is incomplete (crash during append)
    "unanchored",  # one valid record past the anchor
    "truncated",  # the log ends before the anchored record
    "forged",  # the log ends at the anchored seq, with another hash
    "checkpoint",  # a (seq, hash) the operator wrote down does not match
)


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_log` found.

    Attributes:
        ok: the whole retained chain is intact and ends at the anchor.
        entries: records checked and found good before any problem.
        error: the first problem, naming file and line; ``None`` when ok.
        files: the files walked, oldest first.
        kind: one of :data:`KINDS` when not ok, else ``""``.
        anchor: the anchor as read, if it could be.
        unfinished: the last ``pending`` record of every request without an outcome line.
    """

    ok: bool
    entries: int
    error: str | None
    files: list[Path] = field(default_factory=list)
    kind: str = ""
    anchor: Anchor | None = None
    unfinished: tuple[AuditRecord, ...] = ()


class ChainBrokenError(Exception):
    """Where and how the chain breaks (``kind`` is one of :data:`KINDS`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class ChainWalk:
    """The one chain checker: fed records in order (:meth:`take`), then :meth:`finish`.

    ``verify_log`` walks the whole log with it; ``audit show`` (audit/show.py) feeds it as it
    reads, replacing ``anchor`` with the newest one before each batch when it follows.
    """

    anchor: Anchor
    checkpoint: tuple[int, str] | None
    entries: int = 0
    last: AuditRecord | None = None
    where: str = ""
    checkpoint_seen: bool = False
    anchored_hash: str | None = None  # hash of the record whose seq the anchor names
    torn: str = ""
    torn_at: str = ""  # the file, line and size of a torn last line, without advice
    journal: OpenRequests = field(default_factory=OpenRequests)

    def take(self, record: AuditRecord, where: str) -> None:
        last, anchor = self.last, self.anchor
        if last is None:
            if record.seq > anchor.base_seq:
                raise ChainBrokenError(
                    "retention",
                    f"{where}: the oldest retained record is seq {record.seq}, but the anchor "
                    f"says records from seq {anchor.base_seq} on are retained: retained "
                    "files or lines were deleted or moved",
                )
        elif record.seq != last.seq + 1:
            if record.seq > last.seq + 1:
                what = f"records {last.seq + 1}..{record.seq - 1} are missing (deleted)"
            else:
                what = "seq goes backwards (lines reordered or duplicated)"
            raise ChainBrokenError(
                "chain", f"{where}: seq {record.seq} after seq {last.seq}: {what}"
            )
        elif record.prev != last.hash:
            raise ChainBrokenError(
                "chain",
                f"{where}: seq {record.seq} does not chain onto seq {last.seq} (its prev is not "
                "that record's hash): a line was replaced, reordered or inserted",
            )
        if record.seq == anchor.base_seq and record.prev != anchor.base_prev:
            raise ChainBrokenError(
                "retention",
                f"{where}: seq {record.seq} is not the record the anchor says the retained "
                "log starts with",
            )
        if self.checkpoint is not None and record.seq == self.checkpoint[0]:
            if record.hash != self.checkpoint[1]:
                raise ChainBrokenError(
                    "checkpoint",
                    f"{where}: seq {record.seq} has hash {record.hash}, not the "
                    f"{self.checkpoint[1]} written down for it: the log was rewritten",
                )
            self.checkpoint_seen = True
        if record.seq == anchor.seq:
            self.anchored_hash = record.hash
        self.entries += 1
        self.last = record
        self.where = where
        self.journal.feed(record)

    def finish(self) -> None:
        anchor, last = self.anchor, self.last
        if last is None:
            # No records: fine only if the anchor says none are retained.
            if anchor.seq != anchor.base_seq - 1:
                raise ChainBrokenError(
                    "truncated",
                    f"the log holds no records but its anchor records seq {anchor.seq}",
                )
        elif last.seq < anchor.seq:
            raise ChainBrokenError(
                "truncated",
                f"the log ends at seq {last.seq} ({self.where}) but its anchor records seq "
                f"{anchor.seq}: {anchor.seq - last.seq} record(s) were cut from the end",
            )
        elif self.anchored_hash != anchor.hash:
            raise ChainBrokenError(
                "forged",
                f"seq {anchor.seq} is not the record the anchor holds (its hash differs): "
                f"the log was rewritten up to {self.where}",
            )
        elif last.seq == anchor.seq + 1:
            raise ChainBrokenError(
                "unanchored",
                f"{self.where}: the last record (seq {last.seq}) is not anchored: a crash "
                "between append and anchor update, or a line added behind the gate's "
                "back; inspect it, then run `qubes-mcp-admin audit recover`",
            )
        elif last.seq > anchor.seq:
            raise ChainBrokenError(
                "unanchored",
                f"the log runs {last.seq - anchor.seq} records past its anchor (seq "
                f"{anchor.seq}) to {self.where}: lines were added behind the gate's back or "
                "the anchor was rolled back",
            )
        if self.checkpoint is not None and not self.checkpoint_seen:
            raise ChainBrokenError(
                "checkpoint", f"seq {self.checkpoint[0]} is not among the retained records"
            )


def verify_log(path: Path, *, checkpoint: tuple[int, str] | None = None) -> VerifyResult:
    """Verify the log at ``path`` (and its rotated files and anchor).

    Args:
        path: the current log file.
        checkpoint: a (seq, hash) the operator noted earlier (e.g. off-box from a previous
            verify); the log must still contain exactly that record.
    """
    files: list[Path] = []
    anchor: Anchor | None = None
    walk: ChainWalk | None = None
    try:
        if not path.parent.is_dir():
            raise ChainBrokenError("missing", f"no audit log at {path}")
        with shared_lock(path):
            anchor = read_anchor(path, ReadCounter())
            files = [p for _seq, p in archives(path)]
            if path.exists():
                files.append(path)
            if anchor is None:
                if not files:
                    raise ChainBrokenError("missing", f"no audit log at {path}")
                raise ChainBrokenError("anchor", f"anchor file {anchor_path(path)} is missing")
            for item in [path.parent, anchor_path(path), *files]:
                try:
                    check_private(os.stat(item), item)
                except AuditError as err:
                    raise ChainBrokenError("permissions", err.reason) from err
            walk = ChainWalk(anchor, checkpoint)
            for index, file in enumerate(files):
                _walk_file(walk, file, path, last_file=index == len(files) - 1)
            walk.finish()
    except ChainBrokenError as err:
        return _broken(err.kind, err.message, walk, files, anchor)
    except AuditError as err:  # read_anchor: the anchor file is malformed
        return _broken("anchor", err.reason, walk, files, anchor)
    except OSError as err:
        return _broken("unreadable", f"cannot read the audit log: {err}", walk, files, anchor)
    if walk.torn:
        return _broken("torn", walk.torn, walk, files, anchor)
    return VerifyResult(True, walk.entries, None, files, "", anchor, tuple(walk.journal.open()))


def _broken(
    kind: str, message: str, walk: ChainWalk | None, files: list[Path], anchor: Anchor | None
) -> VerifyResult:
    if walk is not None and walk.torn and kind != "torn":
        last, anchor_seq = walk.last, walk.anchor.seq
        ends = last.seq if last is not None else walk.anchor.base_seq - 1
        if kind == "truncated" and ends == anchor_seq - 1:
            # The torn line is where the anchored record was: it never fully reached the
            # disk, or the file was cut inside it. Say exactly what repairs it, and at what cost.
            kind, message = (
                "torn",
                (
                    f"{walk.torn_at}: it held the anchored record (seq {anchor_seq}), which "
                    "is lost: `qubes-mcp-admin audit recover --accept-loss` moves it aside and "
                    "records the loss in the chain"
                ),
            )
        else:
            kind, message = "torn", f"{walk.torn}; besides, {message}"
    entries = walk.entries if walk is not None else 0
    return VerifyResult(False, entries, message, files, kind, anchor)


@contextmanager
def shared_lock(path: Path) -> Iterator[None]:
    """Hold the writers' lock shared (if the log has one) so that no append runs meanwhile:
    the files and the anchor read under it are one consistent state."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _walk_file(walk: ChainWalk, file: Path, current: Path, *, last_file: bool) -> None:
    named = None if file == current else int(file.name.rsplit(".", 1)[1])
    lineno = 0
    with open(file, "rb", opener=lambda p, f: os.open(p, f | OPEN_FLAGS)) as stream:
        while untrusted_line := stream.readline(MAX_LINE_BYTES + 2):
            lineno += 1
            where = f"{file} line {lineno}"
            if not untrusted_line.endswith(b"\n"):
                if len(untrusted_line) > MAX_LINE_BYTES:
                    raise ChainBrokenError("corrupt", f"{where}: longer than any record")
                if last_file and not stream.read(1):
                    walk.torn_at = (
                        f"{where}: the last line is incomplete ({len(untrusted_line)} bytes, "
                        "no newline)"
                    )
                    walk.torn = (
                        f"{walk.torn_at}: torn by a crash during append; `qubes-mcp-admin audit "
                        "recover` moves it aside"
                    )
                    return
                raise ChainBrokenError("corrupt", f"{where}: incomplete line inside the log")
            try:
                record = parse_line(untrusted_line[:-1])
            except RecordError as err:
                raise ChainBrokenError("corrupt", f"{where}: not a valid record: {err}") from err
            walk.take(record, where)
            if lineno == 1 and named is not None and record.seq != named:
                raise ChainBrokenError(
                    "chain", f"{where}: file is named for seq {named} but starts at {record.seq}"
                )
    if lineno == 0 and named is not None:
        raise ChainBrokenError("corrupt", f"{file}: a rotated file is empty")


def audit_verify_main(path: Path, out: TextIO, *, checkpoint: tuple[int, str] | None = None) -> int:
    """``qubes-mcp-admin audit verify [--log PATH]``: print the verdict, return the exit code.

    Returns:
        0 when the chain is intact and anchored; 1 when it is broken (the message names the
        file and line); 2 when there is no log or it cannot be read.
    """
    result = verify_log(path, checkpoint=checkpoint)
    if result.ok:
        anchor = result.anchor
        assert anchor is not None  # ok implies an anchor was read
        print(
            f"audit log ok: {result.entries} records in {len(result.files)} file(s), "
            f"chain intact and anchored at seq {anchor.seq}",
            file=out,
        )
        # Written down off-box, this line lets a later `verify --checkpoint` catch even a
        # rewrite of the whole log and its anchor.
        print(f"checkpoint: {anchor.seq}:{anchor.hash}", file=out)
        _print_unfinished(result.unfinished, out)
        return 0
    print(
        f"audit log {'unavailable' if result.kind in {'missing', 'unreadable'} else 'BROKEN'}"
        f" ({result.kind}): {result.error}",
        file=out,
    )
    return 2 if result.kind in {"missing", "unreadable"} else 1


def _print_unfinished(unfinished: tuple[AuditRecord, ...], out: TextIO) -> None:
    if not unfinished:
        return
    print(
        f"note: {len(unfinished)} request(s) have a pending line and no outcome: in flight, "
        "or the gate stopped while handling them (its start-up recovery records what it did):",
        file=out,
    )
    for record in unfinished[:UNFINISHED_SHOWN]:
        consent = " (waiting for consent)" if record.detail.get("consent") == "asked" else ""
        print(
            f"  seq {record.seq} {record.ts} {record.principal} {record.op} "
            f"{' '.join(record.targets)} request {record.request_id}{consent}",
            file=out,
        )
    if len(unfinished) > UNFINISHED_SHOWN:
        print(f"  … and {len(unfinished) - UNFINISHED_SHOWN} more", file=out)
