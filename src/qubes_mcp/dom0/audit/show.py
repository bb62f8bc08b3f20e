"""``qubes-mcp-admin audit show``: the audit log as a timeline a person can read.

One line per request: the ``pending`` line a state-changing request writes before it acts is
paired with its outcome line by ``request_id``; a refused request (one line) is one line; an
operator's act (audit/acts.py) likewise. Each line shows the time, the principal, the
operation, the qube(s), decision and outcome, and the key arguments from ``detail`` (the
argv, a path, a property, a destination …). Lines appear in the order requests *finished*
(so ``--follow`` can print each as soon as it is complete); the ``seq`` range says where its
records are.

Reading is also verifying. The rotated files are read oldest first, then the current file,
and every record goes through the same checks as ``audit verify``: ``parse_line`` (canonical
bytes, hash) and :class:`~qubes_mcp.dom0.audit.verify.ChainWalk` (seq, prev, the anchor at
both ends). Where a check fails a marker line says so, and every line after it is marked
``UNVERIFIED`` — the reader goes on, because an operator investigating an edit needs to see
what is there, but is never led to trust it.

The log is untrusted input for the terminal too: every value is passed through
:func:`~qubes_mcp.dom0.describe.escape` for each character outside printable ASCII, so no
control, bidi or other non-ASCII character reaches the screen. (The log itself already
escapes controls; this also holds for a line someone wrote into the file by hand.)
``--json`` prints one JSON object per line (ASCII, for machines), ``--follow`` keeps polling
the log (and follows its rotation) until interrupted.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import re
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from qubes_mcp.dom0.audit.clean import DetailValue
from qubes_mcp.dom0.audit.files import OPEN_FLAGS, AuditError, ReadCounter, archives, read_anchor
from qubes_mcp.dom0.audit.record import (
    MAX_LINE_BYTES,
    AuditRecord,
    RecordError,
    load_json,
    parse_line,
)
from qubes_mcp.dom0.audit.verify import ChainBrokenError, ChainWalk, shared_lock
from qubes_mcp.dom0.describe import escape

#: the ``detail`` keys shown on a timeline line, in this order (the rest is in ``--json``)
KEY_ARGS: Final = (
    *("argv", "argv_capped", "path", "property", "feature", "tag", "service", "field"),
    *("source", "dest", "template", "klass", "device", "volume", "size", "rule_count"),
    *("files", "bytes", "exit_code", "stdin_bytes", "stdout_bytes", "stderr_bytes"),
    *("tier", "scope", "consent", "consent_id", "plan_id", "step", "uid", "sudo_uid", "purge"),
    "answered_by",
    *("reason", "error_class", "qubesd_error", "summary", "count", "recorded_late"),
)
#: requests whose outcome has not been read yet, at most (older ones are shown as they are)
_OPEN_CAP: Final = 10_000
_CHUNK: Final = 1 << 20
_UNSAFE: Final = re.compile(r"[^\x20-\x7e]")


def terminal_safe(untrusted_text: str) -> str:
    """Printable ASCII only: each other character becomes describe.escape's visible escape.

    The backslash is left alone: the log's own escaping already wrote an agent's backslash
    as ``\\\\``, so the text reads as the log holds it.
    """
    return _UNSAFE.sub(lambda m: escape(m.group()), untrusted_text)


# --- filters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """``--since``/``--until``: a sequence number (``seq:N``) or a UTC time."""

    seq: int | None = None
    time: datetime.datetime | None = None

    @classmethod
    def parse(cls, text: str) -> Bound:
        """``seq:N``, or an ISO 8601 date or time (UTC unless it names an offset).

        Raises:
            ValueError: neither.
        """
        if text.startswith("seq:"):
            if not text[4:].isdigit():
                raise ValueError(f"{text!r}: seq:N needs a number")
            return cls(seq=int(text[4:]))
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{text!r} is neither seq:N nor an ISO time like 2026-11-29T16:00"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return cls(time=moment)

    def position(self, record: AuditRecord) -> int:
        """-1, 0 or 1: the record is before, at or after this bound."""
        if self.seq is not None:
            mine, theirs = self.seq, record.seq
            return (theirs > mine) - (theirs < mine)
        assert self.time is not None
        try:
            when = datetime.datetime.fromisoformat(record.ts.replace("Z", "+00:00"))
        except ValueError:
            return 0  # a record without a readable time is not filtered out by time
        return (when > self.time) - (when < self.time)


@dataclass(frozen=True)
class Filters:
    """What to show; the text filters are shell patterns (``--op 'operator.*'``)."""

    since: Bound | None = None
    until: Bound | None = None
    principal: str | None = None
    qube: str | None = None
    op: str | None = None
    outcome: str | None = None

    def match(self, entry: Entry) -> bool:
        first = entry.first
        if self.since is not None and self.since.position(first) < 0:
            return False
        if self.until is not None and self.until.position(first) > 0:
            return False
        if self.principal is not None and not fnmatch.fnmatchcase(first.principal, self.principal):
            return False
        if self.op is not None and not fnmatch.fnmatchcase(first.op, self.op):
            return False
        if self.qube is not None and not any(
            fnmatch.fnmatchcase(q, self.qube) for q in entry.qubes()
        ):
            return False
        return self.outcome is None or self.outcome in (entry.outcome, entry.decision)


# --- one request ------------------------------------------------------------------------------


@dataclass
class Entry:
    """One request: its first record and, for a ``pending`` one, its outcome record."""

    first: AuditRecord
    last: AuditRecord | None = None
    verified: bool = True

    @property
    def outcome(self) -> str:
        return (self.last or self.first).outcome

    @property
    def decision(self) -> str:
        return (self.last or self.first).decision

    @property
    def complete(self) -> bool:
        return self.first.outcome != "pending" or self.last is not None

    def detail(self) -> dict[str, DetailValue]:
        """What both lines say (the outcome line knows more: exit code, sizes, argv)."""
        return {**self.first.detail, **(self.last.detail if self.last else {})}

    def qubes(self) -> list[str]:
        detail = self.detail()
        extra = [str(detail[k]) for k in ("source", "dest") if isinstance(detail.get(k), str)]
        return [*self.first.targets, *extra]

    def as_json(self) -> dict[str, object]:
        last = self.last or self.first
        return {
            "seq": self.first.seq,
            "last_seq": last.seq,
            "ts": self.first.ts,
            "end_ts": last.ts,
            "principal": self.first.principal,
            "op": self.first.op,
            "targets": list(self.first.targets),
            "decision": self.decision,
            "outcome": self.outcome if self.complete else "no-outcome-yet",
            "code": last.code,
            "request_id": self.first.request_id,
            "detail": self.detail(),
            "verified": self.verified,
        }

    def text(self) -> str:
        last = self.last or self.first
        seqs = f"{self.first.seq}" if last is self.first else f"{self.first.seq}-{last.seq}"
        outcome = self.outcome if self.complete else "no-outcome-yet"
        parts = [
            "UNVERIFIED" if not self.verified else "",
            self.first.ts,
            f"#{seqs}",
            self.first.principal,
            self.first.op,
            ",".join(self.first.targets) or "-",
            f"{self.decision}/{outcome}" + (f"({last.code})" if last.code else ""),
            *(_key_arg(k, v) for k, v in self.detail().items() if k in KEY_ARGS),
        ]
        return terminal_safe(" ".join(p for p in parts if p))


def _key_arg(key: str, value: DetailValue) -> str:
    if key == "argv" and isinstance(value, list):
        return "argv=[" + " ".join(shlex.quote(str(a)) for a in value) + "]"
    if isinstance(value, list):
        return f"{key}=" + ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return f"{key}={'yes' if value else 'no'}"
    text = str(value)
    return f"{key}={shlex.quote(text) if text != shlex.quote(text) else text}"


class Timeline:
    """Pairs each ``pending`` record with its outcome; yields whole requests."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, Entry] = OrderedDict()

    def add(self, record: AuditRecord, *, verified: bool) -> list[Entry]:
        rid = record.request_id
        if record.outcome == "pending" and rid:
            done = [self._open.pop(rid)] if rid in self._open else []  # a repeated id
            self._open[rid] = Entry(record, verified=verified)
            while len(self._open) > _OPEN_CAP:
                done.append(self._open.popitem(last=False)[1])
            return done
        entry = self._open.pop(rid, None) if rid else None
        if entry is None:
            return [Entry(record, verified=verified)]
        entry.last = record
        entry.verified = entry.verified and verified
        return [entry]

    def flush(self) -> list[Entry]:
        """The requests still waiting for their outcome (at the end of a one-shot read)."""
        entries = list(self._open.values())
        self._open.clear()
        return entries


# --- reading across files, verifying as it goes -----------------------------------------------


@dataclass(frozen=True)
class Marker:
    """A place where verification failed (or the log could not be read)."""

    kind: str
    message: str

    def text(self) -> str:
        return terminal_safe(
            f"!! audit log verification FAILED ({self.kind}): {self.message} "
            "-- the lines below are UNVERIFIED"
        )

    def as_json(self) -> dict[str, object]:
        return {"marker": "verification-failed", "kind": self.kind, "message": self.message}


@dataclass
class _Open:
    fd: int
    path: Path
    ino: int
    offset: int = 0
    lineno: int = 0


@dataclass
class LogReader:
    """Reads every record of the log in chain order, once, across rotation; verifies each.

    Call :meth:`poll` repeatedly: the first call reads what is there, later calls what was
    appended since (following the current file into its rotated name and the new current
    file after it). Each call holds the writers' lock shared, so it sees whole appends.
    """

    path: Path
    verified: bool = True
    walk: ChainWalk | None = None
    _cur: _Open | None = None
    _seen_seq: int = 0  # the last seq read (verified or not): rotated files up to it are read
    _reported: set[str] = field(default_factory=set)

    def poll(self) -> Iterator[tuple[AuditRecord, bool] | Marker]:
        """New records as (record, verified), and markers where verification failed.

        Raises:
            AuditError: there is no log at ``path``.
        """
        out: list[tuple[AuditRecord, bool] | Marker] = []
        with shared_lock(self.path):
            try:
                anchor = read_anchor(self.path, ReadCounter())
            except AuditError as err:
                anchor = None
                out += self._fail("anchor", err.reason)
            if anchor is None and self.walk is None:
                if not self.path.exists() and not archives(self.path):
                    raise AuditError(f"no audit log at {self.path}")
                out += self._fail("anchor", f"the anchor file of {self.path} is missing")
            if anchor is not None:
                if self.walk is None:
                    self.walk = ChainWalk(anchor, None)
                self.walk.anchor = anchor
            out += self._read_new()
            if self.verified and self.walk is not None:
                try:
                    self.walk.finish()
                except ChainBrokenError as err:
                    out += self._fail(err.kind, err.message)
        yield from out

    def close(self) -> None:
        if self._cur is not None:
            os.close(self._cur.fd)
            self._cur = None

    def _fail(self, kind: str, message: str) -> list[Marker]:
        """A marker, once per distinct problem; everything read after it is unverified."""
        self.verified = False
        if message in self._reported:
            return []
        self._reported.add(message)
        return [Marker(kind, message)]

    def _read_new(self) -> list[tuple[AuditRecord, bool] | Marker]:
        out: list[tuple[AuditRecord, bool] | Marker] = []
        cur = self._cur
        if cur is not None:
            out += self._read_lines(cur, final=False)
        try:
            ino = os.stat(self.path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            ino = None
        if cur is not None and cur.ino == ino:
            return out
        # first call, or the file we followed was rotated: the rotated files we have not
        # read (oldest first), then the new current file
        for _seq, rotated in archives(self.path):
            try:
                st = os.stat(rotated, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if cur is not None and (st.st_ino == cur.ino or _seq <= self._seen_seq):
                continue
            out += self._read_file(rotated)
        self.close()
        if ino is not None:
            fd = os.open(self.path, os.O_RDONLY | OPEN_FLAGS)
            self._cur = _Open(fd, self.path, os.fstat(fd).st_ino)
            out += self._read_lines(self._cur, final=False)
        return out

    def _read_file(self, path: Path) -> list[tuple[AuditRecord, bool] | Marker]:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
        try:
            return self._read_lines(_Open(fd, path, os.fstat(fd).st_ino), final=True)
        finally:
            os.close(fd)

    def _read_lines(self, src: _Open, *, final: bool) -> list[tuple[AuditRecord, bool] | Marker]:
        """Complete lines from ``src.offset`` on; an incomplete last line stays unread (it is
        torn: appends are whole while the lock is held) and is reported once."""
        out: list[tuple[AuditRecord, bool] | Marker] = []
        size = os.fstat(src.fd).st_size
        buffer = b""
        while src.offset + len(buffer) < size:
            chunk = os.pread(src.fd, _CHUNK, src.offset + len(buffer))
            if not chunk:
                break
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                src.lineno += 1
                out += self._take(buffer[start:end], f"{src.path} line {src.lineno}")
                start = end + 1
            src.offset += start
            buffer = buffer[start:]
            if len(buffer) > MAX_LINE_BYTES:
                out += self._fail("corrupt", f"{src.path} line {src.lineno + 1}: too long")
                src.offset += len(buffer)  # skip it
                buffer = b""
        if buffer:
            where = f"{src.path} line {src.lineno + 1}"
            out += self._fail("torn", f"{where}: incomplete ({len(buffer)} bytes, no newline)")
            if final:
                src.offset += len(buffer)
        return out

    def _take(self, untrusted_line: bytes, where: str) -> list[tuple[AuditRecord, bool] | Marker]:
        try:
            record = parse_line(untrusted_line)
        except RecordError as err:
            marker = self._fail("corrupt", f"{where}: not a valid record: {err}")
            shown = _as_claimed(untrusted_line)  # what the edited line says, never trusted
            return [*marker, *([(shown, False)] if shown is not None else [])]
        self._seen_seq = max(self._seen_seq, record.seq)
        markers: list[Marker] = []
        if self.verified and self.walk is not None:
            try:
                self.walk.take(record, where)
            except ChainBrokenError as err:
                markers = self._fail(err.kind, err.message)
        return [*markers, (record, self.verified)]


def _as_claimed(untrusted_line: bytes) -> AuditRecord | None:
    """A line that failed verification, read for display only (shown ``UNVERIFIED``): an
    investigator wants to see what an edited line now claims. ``None`` if it is not even a
    JSON object; fields of the wrong type are shown empty."""
    try:
        untrusted = load_json(untrusted_line, MAX_LINE_BYTES)
    except RecordError:
        return None

    def text(key: str) -> str:
        value = untrusted.get(key)
        return value if isinstance(value, str) else ""

    seq = untrusted.get("seq")
    targets = untrusted.get("targets")
    untrusted_detail = untrusted.get("detail")
    detail: dict[str, DetailValue] = {}
    if isinstance(untrusted_detail, dict):
        for key, value in untrusted_detail.items():
            if isinstance(value, str | int | bool) or value is None:
                detail[str(key)] = value
            elif isinstance(value, list):
                detail[str(key)] = [v if isinstance(v, str | int) else str(v) for v in value]
    return AuditRecord(
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        ts=text("ts"),
        prev=text("prev"),
        hash=text("hash"),
        principal=text("principal"),
        op=text("op"),
        targets=tuple(str(t) for t in targets) if isinstance(targets, list) else (),
        decision=text("decision"),
        code=text("code"),
        outcome=text("outcome"),
        request_id=text("request_id"),
        detail=detail,
    )


# --- the command ------------------------------------------------------------------------------


def audit_show_main(
    path: Path,
    out: TextIO,
    filters: Filters = Filters(),
    *,
    as_json: bool = False,
    follow: bool = False,
    interval: float = 0.5,
    stop: threading.Event | None = None,
) -> int:
    """``qubes-mcp-admin audit show``: print the timeline; with ``follow``, keep printing new
    requests until ``stop`` is set or the user interrupts (SIGINT ends it cleanly).

    Returns:
        0 when everything shown was verified; 1 when a verification marker was printed; 2 when
        there is no log or it cannot be read.
    """
    reader = LogReader(path)
    timeline = Timeline()

    def emit(item: Entry | Marker) -> None:
        if isinstance(item, Entry) and not filters.match(item):
            return
        line = json.dumps(item.as_json(), sort_keys=True) if as_json else item.text()
        print(line, file=out, flush=follow)

    try:
        while True:
            for item in reader.poll():
                if isinstance(item, Marker):
                    emit(item)
                    continue
                for entry in timeline.add(item[0], verified=item[1]):
                    emit(entry)
            if not follow or (stop is not None and stop.is_set()):
                break
            if stop is not None:
                stop.wait(interval)
            else:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    except (AuditError, OSError) as err:
        print(terminal_safe(f"audit show: cannot read the audit log: {err}"), file=out)
        return 2
    finally:
        reader.close()
    if not follow:
        for entry in timeline.flush():
            # "no outcome" is a claim about the whole log: only as good as its verification
            entry.verified = entry.verified and reader.verified
            emit(entry)
    return 0 if reader.verified else 1


def describe_filters(values: Mapping[str, str | None]) -> Filters:
    """The CLI's options as :class:`Filters`.

    Raises:
        ValueError: a ``--since``/``--until`` that is neither ``seq:N`` nor a time.
    """
    since, until = values.get("since"), values.get("until")
    return Filters(
        since=Bound.parse(since) if since else None,
        until=Bound.parse(until) if until else None,
        principal=values.get("principal"),
        qube=values.get("qube"),
        op=values.get("op"),
        outcome=values.get("outcome"),
    )
