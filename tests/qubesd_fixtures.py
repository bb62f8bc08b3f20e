"""Helpers for the emulated qubesd's tests: an in-process server on a background event loop,
raw socket calls, state snapshots, and the two fixtures (demo fleet, R4.3 api_admin setUp).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.sim.fleet import load_fleet
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import QubesApp, lifecycle, persist, start_qubesd

TIMEOUT = 20.0


class Qubesd:
    """Our qubesd on a private event loop; every state access runs on that loop."""

    def __init__(self, app: QubesApp) -> None:
        self.app = app
        self.paths = app.paths
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Any = None

    def start(self) -> Qubesd:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        self.server = self.run(start_qubesd(self.app, self.paths))
        return self

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def on_loop(self, func: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return func()

        return self.run(wrapper())

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=TIMEOUT)
        self.loop.close()

    # --- talking to it -------------------------------------------------------------------

    def raw(self, data: bytes, internal: bool = False, half_close: bool = True) -> bytes:
        """Send ``data`` as one request and read the reply to EOF (or reset)."""
        path = self.paths.qubesd_internal_sock if internal else self.paths.qubesd_sock
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            try:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            out = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
            return out

    def call(
        self,
        dest: str,
        method: str,
        arg: str = "",
        payload: bytes = b"",
        src: str = "dom0",
    ) -> bytes:
        header = f"{method}+{arg} {src} name {dest}".encode()
        return self.raw(header + b"\0" + payload)

    def snapshot(self) -> str:
        """Everything persistent plus power states, as text (for state-unchanged checks)."""

        def take() -> str:
            data = persist.to_json(self.app)
            data["power"] = {vm.name: vm.power for vm in self.app.domains.values()}
            return json.dumps(data, sort_keys=True)

        return str(self.on_loop(take))


def ok(text: str = "") -> bytes:
    return b"0\0" + text.encode()


def err(klass: str, message: str) -> bytes:
    return b"2\0" + klass.encode() + b"\0\0" + message.encode() + b"\0"


def api_admin_app(root: Path, uuids: dict[str, str] | None = None) -> QubesApp:
    """The fixture of R4.3 ``qubes/tests/api_admin.py`` ``setUp``, rebuilt in the emulator."""
    app = QubesApp.new(SimPaths(root))
    app.autosave = False
    app.props["default_kernel"] = "1.0"
    app.props["default_netvm"] = None
    tpl = lifecycle.create_vm(app, "TemplateVM", "test-template", app.label_by_name("black"))
    app.props["default_template"] = "test-template"
    app.props["default_pool"] = "varlibqubes"
    lifecycle.create_vm(app, "AppVM", "test-vm1", app.label_by_name("red"), tpl)
    for name, value in (uuids or {}).items():
        app.domains[name].props["uuid"] = value
    app.autosave = True
    return app


def demo_app(root: Path) -> QubesApp:
    return load_fleet(None, SimPaths(root))


@pytest.fixture(name="demo")
def demo_fixture(tmp_path: Path) -> Iterator[Qubesd]:
    """qubesd serving the demo fleet from a fresh root."""
    q = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        yield q
    finally:
        q.stop()


class EventStream:
    """An ``admin.Events`` connection, parsed as the qubesadmin events client does."""

    def __init__(self, q: Qubesd, dest: str = "dom0", src: str = "dom0") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(q.paths.qubesd_sock))
        self.sock.sendall(f"admin.Events+ {src} name {dest}\0".encode())
        self.sock.shutdown(socket.SHUT_WR)
        self.buf = b""
        self.events: list[tuple[str, str, dict[str, str]]] = []
        self.closed = False

    def _parse(self) -> None:
        while True:
            parts = self.buf.split(b"\0")
            # header "1", subject, event, then k, v pairs, then an empty key
            if len(parts) < 4:
                return
            if parts[0] != b"1":
                raise AssertionError(f"not an event message: {self.buf[:40]!r}")
            i = 3
            kwargs: dict[str, str] = {}
            while i < len(parts) - 1 and parts[i] != b"":
                if i + 1 >= len(parts) - 1:
                    return
                kwargs[parts[i].decode()] = parts[i + 1].decode()
                i += 2
            if i >= len(parts) - 1:
                return
            self.events.append((parts[1].decode(), parts[2].decode(), kwargs))
            self.buf = b"\0".join(parts[i + 1 :])

    def wait_for(self, predicate: Callable[[list[tuple[str, str, dict[str, str]]]], bool]) -> None:
        """Read until ``predicate(events)`` holds (bounded by the socket timeout)."""
        while not predicate(self.events):
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                raise AssertionError(f"stream closed; got {self.events}")
            self.buf += chunk
            self._parse()

    def names(self, subject: str | None = None) -> list[str]:
        return [e for s, e, _ in self.events if subject is None or s == subject]

    def close(self) -> None:
        self.sock.close()
