"""Fixtures shared by every test directory: bubblewrap detection and a running emulator."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from qubes_mcp.sim.paths import SimPaths

# A loaded 2-core CI machine must not turn slow data generation into failures; the properties
# are what is tested, not the speed. Deadlines off for the same reason.
settings.register_profile(
    "qubes-mcp", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("qubes-mcp")

BWRAP_REASON = (
    "bubblewrap (bwrap) is required to run commands in emulated qubes; "
    "install it (apt-get install bubblewrap)"
)


def bwrap_usable() -> bool:
    """bwrap exists and can create the namespaces the sandboxes need on this machine."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    probe = subprocess.run(
        [exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


_BWRAP = bwrap_usable()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _BWRAP:
        return
    skip = pytest.mark.skip(reason=BWRAP_REASON)
    for item in items:
        if "bwrap" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[RunningEmulator]:
    """A fresh emulated dom0 with the demo fleet, as a real ``sim run`` subprocess."""
    emu = start_emulator(tmp_path / "root")
    try:
        yield emu
    finally:
        emu.stop()
