"""Where the audit log keeps its files, and the few bounded reads and durable writes on them.

Layout, all in one directory (mode 0700, owned by the gate's user; files 0600)::

    audit.log                  the current file, one record per line (audit/record.py)
    audit.log.000000012345     rotated files, named by the seq of their first record
    audit.log.head             the anchor: last seq + hash, and where the retained chain starts
    audit.log.lock             flock'd by every writer (threads and processes) and by verify
    audit.log.torn-<seq>       a crash fragment moved aside by ``AuditLog.recover``
    audit.log.exported         the last record the operator exported (``audit checkpoint``):
                               rotation never deletes a file holding a record after it

Every read here has a hard cap and adds to a :class:`ReadCounter`, so tests can prove that
an append reads O(1) bytes however long the log is.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path
from typing import Final

from qubes_mcp.dom0.audit.record import (
    ANCHOR_CAP,
    MAX_LINE_BYTES,
    Anchor,
    AuditRecord,
    RecordError,
    parse_anchor,
    parse_line,
)
from qubes_mcp.dom0.errors import UnavailableError

OPEN_FLAGS: Final = os.O_CLOEXEC | os.O_NOFOLLOW


class AuditError(UnavailableError):
    """The log could not record a request, so the gate refuses it (``unavailable``).

    The agent sees only the fixed ``unavailable`` message (``to_reply()``); ``reason`` and
    ``str()`` name the file and what is wrong, for the operator and the dom0 journal.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason=reason)

    def __str__(self) -> str:
        return self.reason


def anchor_path(path: Path) -> Path:
    """The anchor ("head") file of the log at ``path``."""
    return path.with_name(path.name + ".head")


def lock_path(path: Path) -> Path:
    """The lock file every writer of the log at ``path`` holds (``flock``)."""
    return path.with_name(path.name + ".lock")


def exported_path(path: Path) -> Path:
    """The export checkpoint of the log at ``path``: an :class:`Anchor`-format file whose
    (seq, hash) is the last record the operator has copied off the machine."""
    return path.with_name(path.name + ".exported")


def chain_exists(path: Path) -> bool:
    """Whether a chain was ever started at ``path``: an anchor, a rotated file, or records.

    An empty current file with neither (an older version's refused append left one) is not a
    chain, so ``install`` may start one there.
    """
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        size = 0
    return size > 0 or anchor_path(path).exists() or bool(archives(path))


def archive_path(path: Path, first_seq: int) -> Path:
    """Name of a rotated file whose first record is ``first_seq``."""
    return path.with_name(f"{path.name}.{first_seq:012d}")


def archives(path: Path) -> list[tuple[int, Path]]:
    """Rotated files of the log at ``path`` as (first seq from the name, path), oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{12,})")
    found = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match.group(1)), path.parent / name))
    return sorted(found)


class ReadCounter:
    """Counts bytes read from disk through :meth:`pread`."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        self.bytes_read += len(data)
        return data


def read_anchor(path: Path, counter: ReadCounter, *, file: Path | None = None) -> Anchor | None:
    """The anchor of the log at ``path`` (or the Anchor-format ``file``), ``None`` if absent.

    Raises:
        AuditError: the file exists but is not a valid anchor.
    """
    where = file or anchor_path(path)
    try:
        fd = os.open(where, os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        data = counter.pread(fd, ANCHOR_CAP + 1, 0)
    finally:
        os.close(fd)
    try:
        return parse_anchor(data)
    except RecordError as err:
        raise AuditError(f"anchor file {where}: {err}") from err


def read_exported(path: Path, counter: ReadCounter) -> Anchor | None:
    """The operator's export checkpoint of the log at ``path``, ``None`` if never recorded."""
    return read_anchor(path, counter, file=exported_path(path))


def stage_anchor(path: Path, anchor: Anchor, *, file: Path | None = None) -> Path:
    """First half of an anchor replace: the new anchor, durable, under a temporary name.

    Nothing the log depends on has changed yet; on failure the temporary file is removed.
    """
    final = file or anchor_path(path)
    temp = final.with_name(final.name + ".tmp")
    data = anchor.encode()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | OPEN_FLAGS, 0o600)
        try:
            if os.write(fd, data) != len(data):
                raise AuditError(f"short write to {temp}")
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


def publish_anchor(path: Path, temp: Path, *, file: Path | None = None) -> None:
    """Second half: rename the staged anchor over the old one, and make the rename durable."""
    os.replace(temp, file or anchor_path(path))
    fsync_dir(path.parent)


def write_anchor(path: Path, anchor: Anchor, *, file: Path | None = None) -> None:
    """Replace the anchor atomically and durably: temp file, fsync, rename, fsync directory."""
    publish_anchor(path, stage_anchor(path, anchor, file=file), file=file)


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(st: os.stat_result, where: Path) -> None:
    """Refuse a file or directory that is not ours alone (no agent-reachable reader).

    Raises:
        AuditError: owned by another user, or any group/other permission bit is set.
    """
    if st.st_uid != os.geteuid():
        raise AuditError(f"{where} is owned by uid {st.st_uid}, not by this process")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise AuditError(
            f"{where} has mode {mode:04o}; the audit log must be private to its owner "
            "(directory 0700, files 0600)"
        )


def last_line(fd: int, size: int, counter: ReadCounter, where: Path) -> bytes:
    """The last line without its newline, reading at most ``MAX_LINE_BYTES + 1`` bytes.

    Raises:
        AuditError: the last line is incomplete (torn) or impossibly long.
    """
    want = min(size, MAX_LINE_BYTES + 1)
    chunk = counter.pread(fd, want, size - want)
    if not chunk.endswith(b"\n"):
        raise AuditError(
            f"{where}: the last line is incomplete (torn by a crash?); check it with "
            "`qubes-mcp-admin audit verify`, then repair with `qubes-mcp-admin audit recover`"
        )
    start = chunk.rfind(b"\n", 0, len(chunk) - 1)
    if start < 0 and want < size:
        raise AuditError(f"{where}: the last line is longer than any record")
    return chunk[start + 1 : -1]


def first_record(fd: int, counter: ReadCounter, where: Path) -> AuditRecord:
    """The first record of a file (reads at most ``MAX_LINE_BYTES + 1`` bytes).

    Raises:
        AuditError: the first line is incomplete or not a valid record.
    """
    chunk = counter.pread(fd, MAX_LINE_BYTES + 1, 0)
    end = chunk.find(b"\n")
    if end < 0:
        raise AuditError(f"{where}: the first line is incomplete")
    try:
        return parse_line(chunk[:end])
    except RecordError as err:
        raise AuditError(f"{where}: the first line is not a valid record ({err})") from err
