"""qubesd's power operations drive the hypervisor (the qube's sandbox) and follow it: a sandbox
that cannot boot is a failed start, one that dies halts the qube with R4.3's events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.sim import exc
from qubes_mcp.sim.fleet import load_fleet
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import lifecycle
from qubes_mcp.sim.qubesd.app import QubesApp


class FakeHypervisor:
    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start = fail_start
        self.calls: list[tuple[str, str]] = []

    async def _record(self, what: str, name: str) -> None:
        self.calls.append((what, name))

    async def start(self, name: str) -> None:
        await self._record("start", name)
        if self.fail_start:
            raise OSError("bwrap exploded")

    async def shutdown(self, name: str) -> None:
        await self._record("shutdown", name)

    async def kill(self, name: str) -> None:
        await self._record("kill", name)

    async def pause(self, name: str) -> None:
        await self._record("pause", name)

    async def unpause(self, name: str) -> None:
        await self._record("unpause", name)


def app_with(tmp_path: Path, hv: FakeHypervisor) -> tuple[QubesApp, list[tuple[str, str]]]:
    app = load_fleet(None, SimPaths(tmp_path / "root"))
    app.autosave = False
    app.hypervisor = hv
    events: list[tuple[str, str]] = []

    def record(subject: Any, event: str, _kw: dict[str, object]) -> None:
        events.append((getattr(subject, "name", ""), event))

    app.bus.hooks.append(record)
    return app, events


def test_each_power_operation_acts_on_the_sandbox_in_order(tmp_path: Path) -> None:
    hv = FakeHypervisor()
    app, _events = app_with(tmp_path, hv)
    vm = app.domains["work"]

    async def main() -> None:
        await lifecycle.start(app, vm)
        await lifecycle.pause(app, vm)
        await lifecycle.unpause(app, vm)
        await lifecycle.shutdown(app, vm)
        await lifecycle.start(app, vm)
        await lifecycle.kill(app, vm)

    asyncio.run(main())
    work = [c for c in hv.calls if c[1] == "work"]
    assert work == [
        ("start", "work"),
        ("pause", "work"),
        ("unpause", "work"),
        ("shutdown", "work"),
        ("start", "work"),
        ("kill", "work"),
    ]
    assert vm.power == "Halted"


def test_a_sandbox_that_cannot_boot_is_a_failed_start(tmp_path: Path) -> None:
    app, events = app_with(tmp_path, FakeHypervisor(fail_start=True))
    vm = app.domains["work"]
    with pytest.raises(exc.QubesException, match="Failed to start work: bwrap exploded"):
        asyncio.run(lifecycle.start(app, vm))
    assert vm.power == "Halted"
    names = [e for s, e in events if s == "work"]
    assert names[-1] == "domain-start-failed"
    assert "domain-start" not in names


def test_a_sandbox_that_dies_halts_the_qube_with_the_stop_events(tmp_path: Path) -> None:
    app, events = app_with(tmp_path, FakeHypervisor())
    vm = app.domains["work"]
    asyncio.run(lifecycle.start(app, vm))
    events.clear()
    lifecycle.machine_died(app, "work")
    names = [e for s, e in events if s == "work"]
    assert names[0] == "domain-stopped" and names[-1] == "domain-shutdown"
    assert vm.power == "Halted"
    events.clear()
    lifecycle.machine_died(app, "work")  # already halted: nothing more
    lifecycle.machine_died(app, "no-such-qube")
    assert events == []


def test_a_disposable_whose_sandbox_dies_is_cleaned_up(tmp_path: Path) -> None:
    app, _events = app_with(tmp_path, FakeHypervisor())
    disp = lifecycle.new_dispvm(app, app.domains["default-dvm"])
    asyncio.run(lifecycle.start(app, disp))
    lifecycle.machine_died(app, disp.name)
    assert disp.name not in app.domains
    assert not app.paths.qube_dir(disp.name).exists()
