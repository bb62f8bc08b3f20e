"""A ``qubes-mcp sim run`` subprocess for tests, started and stopped as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths


class RunningEmulator:
    """A ``qubes-mcp sim run`` subprocess and its paths."""

    def __init__(self, paths: SimPaths, proc: subprocess.Popen[bytes]) -> None:
        self.paths = paths
        self.proc = proc

    def call(
        self, source: str, target: str, service: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``qubes-mcp sim call`` exactly as a user or test script runs it."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "qubes_mcp.cli",
                "sim",
                "call",
                "--root",
                str(self.paths.root),
                "--from",
                source,
                target,
                service,
            ],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_emulator(root: Path, fleet: Path | None = None, timeout: float = 30) -> RunningEmulator:
    """Start ``qubes-mcp sim run`` and wait until it has written its ready file."""
    paths = SimPaths(root)
    argv = [sys.executable, "-m", "qubes_mcp.cli", "sim", "run", "--root", str(root)]
    if fleet is not None:
        argv += ["--fleet", str(fleet)]
    log = (root.parent / f"{root.name}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    ready = paths.run / "emulator.ready"
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = (root.parent / f"{root.name}.log").read_text(errors="replace")
            raise RuntimeError(f"emulator did not become ready:\n{output[-4000:]}")
        time.sleep(0.05)
    return RunningEmulator(paths, proc)
