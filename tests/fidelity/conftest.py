"""The fidelity harness: the real, unmodified ``qubesadmin`` client against our emulated qubesd.

Set ``QUBESADMIN_SRC`` to a checkout of QubesOS/qubes-core-admin-client (release4.3), e.g.
``QUBESADMIN_SRC=/tmp/qsrc/qubes-core-admin-client``; without it every test here is skipped
(CI has no copy, and none of its code is ever committed here). The client needs only the
standard library for the paths exercised.

The emulator runs in-process: qubesd serves the demo fleet from a temporary root on a
background event loop, and ``qubesadmin.config.QUBESD_SOCKET`` points at its socket.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qubes_mcp.sim.paths import SimPaths

SKIP_REASON = (
    "QUBESADMIN_SRC is not set: point it at a qubes-core-admin-client checkout "
    "(release4.3) to run the fidelity tests against the real qubesadmin client"
)


def _qubesadmin_src() -> Path | None:
    value = os.environ.get("QUBESADMIN_SRC", "")
    return Path(value) if value else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _qubesadmin_src() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/fidelity/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qubesadmin() -> ModuleType:
    """The real client package, imported from ``QUBESADMIN_SRC``."""
    src = _qubesadmin_src()
    if src is None:
        pytest.skip(SKIP_REASON)
    if not (src / "qubesadmin" / "__init__.py").is_file():
        pytest.fail(f"QUBESADMIN_SRC={src} has no qubesadmin package")
    sys.path.insert(0, str(src))
    for name in ("app", "config", "events", "exc", "firewall", "devices", "device_protocol"):
        importlib.import_module(f"qubesadmin.{name}")
    importlib.import_module("qubesadmin.vm")
    return sys.modules["qubesadmin"]


class InProcessQubesd:
    """qubesd (our emulator) on a private event loop in a background thread."""

    def __init__(self, root: Path) -> None:
        self.paths = SimPaths(root)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: Any = None
        self.app: Any = None

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the emulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, func: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a plain function on the emulator's loop (state is only touched there)."""

        async def wrapper() -> Any:
            return func()

        return self.run(wrapper(), timeout)

    def start(self) -> None:
        from qubes_mcp.sim.fleet import boot, open_app
        from qubes_mcp.sim.qubesd import start_qubesd

        for directory in (self.paths.run, self.paths.log_dir, self.paths.state_file.parent):
            directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()

        async def up() -> None:
            self.app = open_app(self.paths, None)
            self._server = await start_qubesd(self.app, self.paths)
            await boot(self.app)

        self.run(up())

    def stop(self) -> None:
        if self._server is not None:
            self.run(self._server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def qubesd(tmp_path: Path) -> Iterator[InProcessQubesd]:
    emu = InProcessQubesd(tmp_path / "root")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def qapp(qubesadmin: ModuleType, qubesd: InProcessQubesd, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``qubesadmin.app.QubesLocal()`` talking to the emulator's socket."""
    monkeypatch.setattr(qubesadmin.config, "QUBESD_SOCKET", str(qubesd.paths.qubesd_sock))
    return qubesadmin.app.QubesLocal()
