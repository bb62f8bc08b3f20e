"""The router's view of the qrexec policy: parsed once, reloaded when its files change.

The real policy daemon watches the directories with inotify; a stat of every file per request
is our equivalent (cheap at policy sizes). A policy that fails to load denies everything, and
the error is logged with its file and line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("qubes_mcp.sim.qrexec")

_Signature = tuple[tuple[str, int, int, int], ...]


def _signature(dirs: Sequence[Path]) -> _Signature:
    entries: list[tuple[str, int, int, int]] = []
    for top in dirs:
        for dirpath, _dirnames, filenames in os.walk(top):
            entries.append((dirpath, 0, 0, 0))
            for filename in filenames:
                path = os.path.join(dirpath, filename)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                entries.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(entries))


class PolicyCache:
    """``get()`` returns the current Policy, or ``None`` when it does not load (deny all)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self.dirs = tuple(dirs)
        self._signature: _Signature | None = None
        self._policy: Any = None

    def get(self) -> Any:
        signature = _signature(self.dirs)
        if signature != self._signature:
            self._policy = self._load()
            self._signature = signature
        return self._policy

    def _load(self) -> Any:
        from qubes_mcp.policy import Policy, PolicyError

        try:
            return Policy.load([d for d in self.dirs if d.is_dir()])
        except PolicyError as exc:
            log.error("qrexec policy does not load, denying everything: %s", exc)
            return None
