"""A ``qubes-mcp sim run`` subprocess for tests, started and stopped as a user would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.stack import sim_call, stop_process
from qubes_mcp.stack import start_emulator as _start


class RunningEmulator:
    """A ``qubes-mcp sim run`` subprocess and its paths."""

    def __init__(self, paths: SimPaths, proc: subprocess.Popen[bytes]) -> None:
        self.paths = paths
        self.proc = proc

    def call(
        self, source: str, target: str, service: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``qubes-mcp sim call`` exactly as a user or test script runs it."""
        return sim_call(self.paths.root, source, target, service, stdin, timeout=timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def start_emulator(root: Path, fleet: Path | None = None, timeout: float = 30) -> RunningEmulator:
    """Start ``qubes-mcp sim run`` and wait until it has written its ready file."""
    return RunningEmulator(SimPaths(root), _start(root, fleet, timeout=timeout))
