"""Repairing the end of the audit log after a crash — and nothing else.

A crash can leave these marks, and append refuses to continue past any of them:

- a *torn* last line: bytes after the last newline (power loss mid-write; on some file
  systems a run of NULs);
- an *unanchored* last record: complete and chained onto the anchor, but the anchor was not
  yet replaced when the process died;
- a torn *anchored* record: the end of the last line never reached the disk although its
  anchor did, or the file was cut inside that line. The record is lost; the repair says
  which one (``lost_seq``, ``lost_hash``), so the chain records the loss.

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

from qubes_mcp.dom0.audit.files import (
    OPEN_FLAGS,
    AuditError,
    ReadCounter,
    archives,
    fsync_dir,
    last_line,
    read_anchor,
    write_anchor,
)
from qubes_mcp.dom0.audit.record import MAX_LINE_BYTES, Anchor, RecordError, parse_line

#: a fragment longer than this is not one interrupted record
_FRAGMENT_CAP = 2 * MAX_LINE_BYTES


def repair_tail(path: Path, reads: ReadCounter, *, accept_loss: bool = False) -> dict[str, object]:
    """Cut off a torn last line and re-anchor the chain where it now ends (lock held by caller).

    Everything is checked before anything is changed: if the end of the log is not a crash
    signature, the files are left exactly as they were.

    Returns:
        ``detail`` for the ``audit.recover`` record: ``torn_bytes``, ``torn_sha256`` (or
        ``None``), ``anchor_lag`` (0 or 1) and, when the torn line was the anchored record
        itself, ``lost_seq`` and ``lost_hash`` — what the anchor vouched for and is now gone.

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
        last = _last_record(fd, size - len(torn), path, anchor, reads)
        new_anchor, lost = _new_anchor(path, anchor, last, torn, accept_loss=accept_loss)
        if not torn and new_anchor is None:
            raise AuditError(f"{path}: its end matches its anchor; nothing to recover")
        # ---- checked: from here on the log is changed ----
        if torn:
            _move_aside(fd, size, torn, path.with_name(f"{path.name}.torn-{anchor.seq + 1}"))
        if new_anchor is not None:
            write_anchor(path, new_anchor)
    finally:
        os.close(fd)
    facts: dict[str, object] = {
        "torn_bytes": len(torn),
        "torn_sha256": hashlib.sha256(torn).hexdigest() if torn else None,
        "anchor_lag": 1 if new_anchor is not None and not lost else 0,
    }
    if lost:
        facts.update(lost_seq=anchor.seq, lost_hash=anchor.hash)
    return facts


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


def _last_record(
    fd: int, size: int, path: Path, anchor: Anchor, reads: ReadCounter
) -> tuple[int, str, str]:
    """(seq, hash, prev) of the last complete record of the chain once the fragment is cut.

    It is the current file's last line, or — when the current file holds nothing else — the
    newest rotated file's last line, or the anchor's base when no record is retained.
    """
    where = path
    if size > 0:
        untrusted_line = last_line(fd, size, reads, path)
    else:
        found = archives(path)
        if not found:
            return anchor.base_seq - 1, anchor.base_prev, ""
        where = found[-1][1]
        afd = os.open(where, os.O_RDONLY | OPEN_FLAGS)
        try:
            untrusted_line = last_line(afd, os.fstat(afd).st_size, reads, where)
        finally:
            os.close(afd)
    try:
        record = parse_line(untrusted_line)
    except RecordError as err:
        raise AuditError(
            f"{where}: the last complete line is not a valid record ({err}): an edit, not a crash"
        ) from err
    return record.seq, record.hash, record.prev


def _new_anchor(
    path: Path, anchor: Anchor, last: tuple[int, str, str], torn: bytes, *, accept_loss: bool
) -> tuple[Anchor | None, bool]:
    """The anchor the repaired log needs (``None``: it already fits), and whether it loses
    the record the old anchor named.

    Three shapes are crash signatures. The chain ends at the anchor (only a torn fragment
    follows it). It ends one chained record past the anchor (the process died before the
    anchor was replaced). Or the anchored record itself is the torn line — its end never
    reached the disk, or the file was cut inside it — so the chain now ends one record
    before the anchor. That looks the same as cutting an anchored line on purpose, so it is
    repaired only when the operator accepts the loss (``--accept-loss``), the fragment does
    not contradict the anchored record (its ``hash``, ``prev`` and ``seq``, where it got that
    far), and the loss is recorded.
    """
    seq, digest, prev = last
    if (seq, digest) == (anchor.seq, anchor.hash):
        return None, False
    if seq == anchor.seq + 1 and prev == anchor.hash:
        return Anchor(seq, digest, anchor.base_seq, anchor.base_prev), False
    if torn and seq == anchor.seq - 1 and _fragment_fits(torn, anchor, digest):
        if accept_loss:
            return Anchor(seq, digest, anchor.base_seq, anchor.base_prev), True
        raise AuditError(
            f"{path}: the torn last line is the anchored record (seq {anchor.seq}) itself, so "
            "repairing it loses that record; if no copy of it exists, run "
            "`qubes-mcp-admin audit recover --accept-loss` (the loss is recorded in the chain)"
        )
    raise AuditError(
        f"{path}: the log ends at seq {seq} but its anchor records seq {anchor.seq}: "
        "an edit or a truncation, not a crash"
    )


def _fragment_fits(untrusted_torn: bytes, anchor: Anchor, prev: str) -> bool:
    """Whether a torn line could be the start of the anchored record chained onto ``prev``.

    A canonical line has its keys sorted (``…"hash":…"prev":…"seq":…``) and a quote inside a
    value is always escaped, so these byte patterns can only be the keys themselves.
    """
    for key, want in ((b'"hash":"', anchor.hash), (b'"prev":"', prev)):
        start = untrusted_torn.find(key)
        if start >= 0:
            value = untrusted_torn[start + len(key) : start + len(key) + 64]
            if not want.encode().startswith(value):
                return False
    start = untrusted_torn.find(b'"seq":')
    if start >= 0:
        digits = untrusted_torn[start + 6 :].split(b",", 1)
        if len(digits) == 2 and digits[0] != str(anchor.seq).encode():
            return False
    return True


def _free_name(candidate: Path) -> Path:
    """``candidate``, or ``candidate.N`` for the first N that does not exist yet."""
    number = 1
    found = candidate
    while found.exists():
        found = candidate.with_name(f"{candidate.name}.{number}")
        number += 1
    return found
