"""Repairing the end of the audit log after a crash — and nothing else.

A crash can leave exactly two marks, and append refuses to continue past either:

- a *torn* last line: bytes after the last newline (power loss mid-write; on some file
  systems a run of NULs);
- an *unanchored* last record: complete and chained onto the anchor, but the anchor was not
  yet replaced when the process died.

:func:`repair_tail` handles only these. The fragment is kept, not deleted, in
``<log>.torn-<seq>`` (0600); the caller then appends an ``audit.recover`` record with the
fragment's size and SHA-256, so the chain itself says a repair happened. Anything else at the
end of the log — a complete line that is not a valid record, a record that does not chain
onto the anchor, a missing anchor — is what an edit or a truncation looks like, and is
refused for a human to investigate.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TextIO

from .audit_files import (
    OPEN_FLAGS,
    AuditError,
    ReadCounter,
    fsync_dir,
    last_line,
    read_anchor,
    write_anchor,
)
from .audit_record import MAX_LINE_BYTES, Anchor, RecordError, parse_line

#: a fragment longer than this is not one interrupted record
_FRAGMENT_CAP = 2 * MAX_LINE_BYTES


def repair_tail(path: Path, reads: ReadCounter) -> dict[str, object]:
    """Cut off a torn last line and anchor an unanchored last record (lock held by caller).

    Everything is checked before anything is changed: if the end of the log is not a crash
    signature, the files are left exactly as they were.

    Returns:
        ``detail`` for the ``audit.recover`` record: ``torn_bytes``, ``torn_sha256`` (or
        ``None``) and ``anchor_lag`` (0 or 1).

    Raises:
        AuditError: the end of the log shows no crash signature, or something else is wrong.
    """
    anchor = read_anchor(path, reads)
    if anchor is None:
        raise AuditError(f"anchor file of {path} is missing: not a crash signature")
    try:
        fd = os.open(path, os.O_RDWR | OPEN_FLAGS)
    except FileNotFoundError:
        raise AuditError(f"{path} does not exist: nothing to recover") from None
    try:
        size = os.fstat(fd).st_size
        torn = _torn_fragment(fd, size, path, reads)
        unanchored = _unanchored_record(fd, size - len(torn), path, anchor, reads)
        if not torn and unanchored is None:
            raise AuditError(f"{path}: its end matches its anchor; nothing to recover")
        # ---- checked: from here on the log is changed ----
        if torn:
            _move_aside(fd, size, torn, path.with_name(f"{path.name}.torn-{anchor.seq + 1}"))
        if unanchored is not None:
            write_anchor(path, unanchored)
    finally:
        os.close(fd)
    return {
        "torn_bytes": len(torn),
        "torn_sha256": hashlib.sha256(torn).hexdigest() if torn else None,
        "anchor_lag": 0 if unanchored is None else 1,
    }


def _torn_fragment(fd: int, size: int, path: Path, reads: ReadCounter) -> bytes:
    """The bytes after the last newline (empty when the file ends with a newline)."""
    if size == 0:
        return b""
    want = min(size, _FRAGMENT_CAP + 1)
    untrusted_chunk = reads.pread(fd, want, size - want)
    cut = untrusted_chunk.rfind(b"\n")
    if cut < 0 and want < size:
        raise AuditError(f"{path}: over {_FRAGMENT_CAP} bytes without a newline at its end")
    return untrusted_chunk[cut + 1 :]


def _move_aside(fd: int, size: int, fragment: bytes, keep: Path) -> None:
    """Save the fragment durably under a new name, then cut it from the log."""
    keep = _free_name(keep)
    kfd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    try:
        if os.write(kfd, fragment) != len(fragment):
            raise AuditError(f"short write to {keep}")
        os.fsync(kfd)
    finally:
        os.close(kfd)
    fsync_dir(keep.parent)
    # Only now, with the fragment safely elsewhere, cut it from the log.
    os.ftruncate(fd, size - len(fragment))
    os.fsync(fd)


def _unanchored_record(
    fd: int, size: int, path: Path, anchor: Anchor, reads: ReadCounter
) -> Anchor | None:
    """The anchor for a valid last record one past the anchor; ``None`` if it is anchored."""
    if size == 0:
        return None
    untrusted_line = last_line(fd, size, reads, path)
    try:
        record = parse_line(untrusted_line)
    except RecordError as err:
        raise AuditError(
            f"{path}: the last complete line is not a valid record ({err}): an edit, not a crash"
        ) from err
    if (record.seq, record.hash) == (anchor.seq, anchor.hash):
        return None
    if record.seq == anchor.seq + 1 and record.prev == anchor.hash:
        return Anchor(record.seq, record.hash, anchor.base_seq, anchor.base_prev)
    raise AuditError(
        f"{path}: the log ends at seq {record.seq} but its anchor records seq {anchor.seq}: "
        "an edit or a truncation, not a crash"
    )


def _free_name(candidate: Path) -> Path:
    """``candidate``, or ``candidate.N`` for the first N that does not exist yet."""
    number = 1
    found = candidate
    while found.exists():
        found = candidate.with_name(f"{candidate.name}.{number}")
        number += 1
    return found


def audit_recover_main(path: Path, out: TextIO, *, reason: str = "") -> int:
    """``qubes-mcp-admin audit recover [--log PATH] [--reason TEXT]``.

    Returns:
        0 when a crash signature was repaired and the repair recorded; 1 when the log's end
        shows no crash signature (nothing changed; run ``audit verify`` and investigate).
    """
    from .audit import AuditLog

    try:
        record = AuditLog(path, create=False).recover(reason=reason)
    except AuditError as err:
        print(f"audit recover refused: {err.reason}", file=out)
        return 1
    detail = record.detail
    print(
        f"audit log recovered: moved aside {detail.get('torn_bytes', 0)} torn bytes, "
        f"anchored {detail.get('anchor_lag', 0)} record(s); recorded as seq {record.seq}",
        file=out,
    )
    return 0
