"""The audit log read as the gate's intent journal: which requests never got an outcome.

A state-changing request leaves a ``pending`` line before it acts (and one before it asks the
operator, ``consent=asked``) and exactly one outcome line after (``ok``, ``failed``,
``rolled-back``, ``not-run``, ``interrupted``), all with the same ``request_id``. A request
whose *last* line is ``pending`` was cut off: the gate stopped while it was acting or waiting.

Two readers use this:

- start-up recovery (dom0/recovery.py) reads only the **tail** of the log,
  :data:`TAIL_SCAN_BYTES` from the end (across the current and rotated files), so a start
  costs the same on a log of any size. A request can only be open if the gate stopped while
  handling it, and every earlier start closed what was open then, so open lines are near the
  end: the bound covers any request the gate was still handling within the last ~8,000
  records (≈ 4 MiB at the typical 500-byte line). A ``pending`` line older than that is not
  reconciled automatically; ``audit verify`` (which walks everything) reports it, and
  ``doctor`` reports any qube it left behind.
- ``audit verify`` feeds every record it walks into an :class:`OpenRequests`.

The tail scan trusts nothing it reads more than the chain walk would: every line goes through
:func:`~qubes_mcp.dom0.audit.record.parse_line` (canonical form, hash); a line that does not
parse (a torn tail, the partial first line of the window) is skipped — integrity is
``verify``'s job, not recovery's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from qubes_mcp.dom0.audit.files import OPEN_FLAGS, archives
from qubes_mcp.dom0.audit.record import AuditRecord, RecordError, parse_line

#: how much of the end of the log start-up recovery reads (see the module docstring)
TAIL_SCAN_BYTES: Final = 4 << 20
#: the dom0 record with which recovery closes a request that left a qube it could not remove
#: (its ``request_id`` is that request's; the request's one outcome line came before it)
SWEEP_OP: Final = "recovery.remove"


class OpenRequests:
    """Requests whose last line so far is ``pending``, fed records in log order; and the
    requests whose outcome says a qube they created could not be removed again."""

    def __init__(self) -> None:
        self._open: dict[str, AuditRecord] = {}
        self._unrolled: dict[str, AuditRecord] = {}

    def feed(self, record: AuditRecord) -> None:
        if not record.request_id:
            return
        if record.op == SWEEP_OP:  # recovery dealt with what this request left
            self._unrolled.pop(record.request_id, None)
            return
        if record.outcome == "pending":
            self._open.pop(record.request_id, None)  # keep log order: latest pending last
            self._open[record.request_id] = record
            return
        self._open.pop(record.request_id, None)
        if record.detail.get("rolled_back") is False:
            self._unrolled[record.request_id] = record

    def open(self) -> list[AuditRecord]:
        """The last ``pending`` record of every request without an outcome, oldest first."""
        return list(self._open.values())

    def unrolled(self) -> list[AuditRecord]:
        """Outcome records of requests that left a qube they could not remove, oldest first."""
        return list(self._unrolled.values())


def _tail_chunks(path: Path, budget: int) -> list[bytes]:
    """Up to ``budget`` bytes from the end of the log, across the current file and as many
    rotated files as the budget reaches (returned oldest first)."""
    files = [p for _seq, p in archives(path)] + ([path] if path.exists() else [])
    chunks: list[bytes] = []
    for file in reversed(files):
        if budget <= 0:
            break
        fd = os.open(file, os.O_RDONLY | OPEN_FLAGS)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - budget)
            data = os.pread(fd, size - start, start)
        finally:
            os.close(fd)
        budget -= len(data)
        if start > 0:  # the window starts mid-line: drop the fragment
            data = data.partition(b"\n")[2]
        chunks.insert(0, data)
    return chunks


def scan_tail(path: Path, budget: int = TAIL_SCAN_BYTES) -> OpenRequests:
    """The journal of the last ``budget`` bytes of the log at ``path``."""
    journal = OpenRequests()
    for chunk in _tail_chunks(path, budget):
        for untrusted_line in chunk.split(b"\n"):
            if not untrusted_line:
                continue
            try:
                journal.feed(parse_line(untrusted_line))
            except RecordError:
                continue
    return journal
