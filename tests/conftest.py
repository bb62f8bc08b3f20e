"""Fixtures shared by every test directory: bubblewrap detection and a running emulator."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.emulator_process import RunningEmulator, start_emulator
from tests.qubesd_fixtures import Qubesd, demo_app

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


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[RunningEmulator]:
    """A fresh emulated dom0 with the demo fleet, as a real ``sim run`` subprocess."""
    emu = start_emulator(tmp_path / "root")
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def qubesd(tmp_path: Path) -> Iterator[Qubesd]:
    """The emulated qubesd with the demo fleet, in this process (no sandboxes)."""
    q = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        yield q
    finally:
        q.stop()
