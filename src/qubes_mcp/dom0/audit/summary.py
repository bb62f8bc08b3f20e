"""Repeated refusals become one summary line per window, so a flood cannot wash the log.

Every refused state-changing request is recorded (DESIGN.md §2, promise 6). Recorded one line
each, a flood of cheap refusals would grow the log as fast as the gate answers, and rotation
would have to forget — or, since it never deletes unexported records, stop the gate. So per
(principal, operation, code) and per window of ``window`` seconds, the first ``full``
refusals are recorded in full (an agent's ordinary mistakes keep every detail) and the rest
are counted; when the window ends the count becomes one line (or at the next append)::

    {"decision":"refused","outcome":"not-run","code":"not-found","op":"qube.start",
     "principal":"work-agent","request_id":"refusals-summary",
     "detail":{"summary":"refusals","count":48113,"window_s":10}, …}

The keys are bounded: the principal and the operation come from qrexec (the policy lets only
configured qubes call known services) and the code from a fixed vocabulary; beyond
``MAX_KEYS`` open windows everything else is counted under ``*``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

WINDOW: Final = 10.0
FULL: Final = 5
MAX_KEYS: Final = 1024
SUMMARY_ID: Final = "refusals-summary"

Key = tuple[str, str, str]  # principal, op, code


@dataclass
class _Window:
    opened: float
    count: int = 0  # counted, not recorded in full
    seen: int = 0  # recorded in full


@dataclass(frozen=True)
class Summary:
    """``count`` refusals of ``key`` after the first, in the window opened at ``opened``."""

    key: Key
    count: int


class RefusalSummary:
    """Which refusals to record in full, and the counts of those that were not."""

    def __init__(
        self, window: float = WINDOW, full: int = FULL, clock: Callable[[], float] = time.monotonic
    ):
        self.window = window
        self.full = full
        self._clock = clock
        self._open: dict[Key, _Window] = {}

    def first(self, key: Key) -> bool:
        """True: record this refusal in full. False: it was counted for the summary line."""
        now = self._clock()
        if key not in self._open and len(self._open) >= MAX_KEYS:
            key = ("*", "*", "*")
        win = self._open.get(key)
        if win is None or now - win.opened >= self.window:
            # a new window; an old one's unwritten count is carried, never dropped
            win = self._open[key] = _Window(now, win.count if win else 0)
        if win.seen < self.full:
            win.seen += 1
            return True
        win.count += 1
        return False

    def due(self, *, everything: bool = False) -> list[Summary]:
        """Take the summaries of the windows that have ended (all of them if ``everything``).

        Windows that ended with nothing counted are simply closed.
        """
        now = self._clock()
        out: list[Summary] = []
        for key, win in list(self._open.items()):
            if everything or now - win.opened >= self.window:
                del self._open[key]
                if win.count:
                    out.append(Summary(key, win.count))
        return out

    def restore(self, summaries: list[Summary]) -> None:
        """Put back counts whose line could not be written (they go into the next line)."""
        now = self._clock()
        for item in summaries:
            win = self._open.setdefault(item.key, _Window(now - self.window))
            win.count += item.count

    @property
    def pending(self) -> int:
        """Refusals counted but not yet in the log."""
        return sum(w.count for w in self._open.values())
