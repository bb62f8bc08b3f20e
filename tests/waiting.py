"""Waiting in tests: for a condition, and for processes on the host (sandboxed ones included)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def host_pids_with(marker: bytes) -> list[int]:
    """Every host process whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def until(
    check: Callable[[], object], timeout: float = 20, why: str = "condition not reached"
) -> None:
    """Poll ``check`` every 50 ms until it is true; fail with ``why`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)
