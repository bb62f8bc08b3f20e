"""A stand-in qubesd for the router's tests, speaking the documented R4.3 bytes
(qubes-internals §1.2–1.4, §7.1): just enough Admin API for what qrexec-daemon calls
(Start, Kill, Shutdown, CreateDisposable, Events) and ``internal.GetSystemInfo``.

It lives here (and is tested here) so the router can be tested before, and independently of,
the real emulated qubesd; ``test_qrexec_with_qubesd.py`` runs against that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qubes_mcp.sim.machine import Hypervisor
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec.client import CallResult, call
from qubes_mcp.sim.qrexec.config import RouterConfig
from qubes_mcp.sim.qrexec.default_policy import install_default_policy
from qubes_mcp.sim.qrexec.dom0_rpc import install_dom0_rpc
from qubes_mcp.sim.qrexec.operator import ScriptedOperator
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient, QubesdError
from qubes_mcp.sim.qrexec.router import Router, start_router
from qubes_mcp.sim.sandbox import BwrapUnavailableError, bwrap_path

T = TypeVar("T")


def domain(
    klass: str = "AppVM",
    *,
    tags: tuple[str, ...] = (),
    running: bool = False,
    dvm_template: bool = False,
    default_dispvm: str | None = "default-dvm",
) -> dict[str, Any]:
    return {
        "tags": list(tags),
        "type": klass,
        "template_for_dispvms": dvm_template,
        "default_dispvm": default_dispvm,
        "internal": False,
        "power_state": "Running" if running else "Halted",
        "uuid": str(uuidlib.uuid4()),
        "icon": "appvm-red",
        "label": "red",
        "guivm": None,
        "relayvm": None,
        "transport_rpc": None,
    }


def standard_domains() -> dict[str, dict[str, Any]]:
    doms = {
        "dom0": domain("AdminVM", running=True, default_dispvm="default-dvm"),
        "work": domain(running=True),
        "personal": domain(),
        "vault": domain(),
        "default-dvm": domain(dvm_template=True),
        "mgmt": domain(running=True, tags=("mgmt",)),
    }
    doms["dom0"]["uuid"] = "00000000-0000-0000-0000-000000000000"
    return doms


@dataclass
class FakeQubesd:
    paths: SimPaths
    domains: dict[str, dict[str, Any]] = field(default_factory=standard_domains)
    record: list[tuple[str, str, str, str, bytes]] = field(default_factory=list)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _listeners: list[asyncio.Queue[bytes]] = field(default_factory=list)
    _disp_counter: int = 1000
    disposable_tags: tuple[str, ...] = ()  # given to every new disposable (e.g. "no-start")
    #: the qubes' sandboxes, as the real qubesd has them (None where bwrap is unusable)
    hypervisor: Hypervisor | None = None

    async def start(self) -> None:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        for name in self.domains:
            self.paths.private_dir(name).mkdir(parents=True, exist_ok=True)
        try:
            bwrap_path()
            self.hypervisor = Hypervisor(self.paths)
        except BwrapUnavailableError:
            self.hypervisor = None
        for name, dom in self.domains.items():
            if name != "dom0" and dom["power_state"] == "Running":
                await self._power(name, start=True)
        for sock in (self.paths.qubesd_sock, self.paths.qubesd_internal_sock):
            self._servers.append(await asyncio.start_unix_server(self._handle, path=str(sock)))

    async def _power(self, name: str, *, start: bool) -> None:
        if self.hypervisor is not None:
            await (self.hypervisor.start(name) if start else self.hypervisor.kill(name))

    async def close(self) -> None:
        if self.hypervisor is not None:
            await self.hypervisor.close()
        for server in self._servers:
            server.close()
        for queue in self._listeners:
            queue.put_nowait(b"")

    def _event(self, subject: str, name: str, **kwargs: str) -> None:
        msg = b"1\0" + subject.encode() + b"\0" + name.encode() + b"\0"
        for key, value in kwargs.items():
            msg += key.encode() + b"\0" + value.encode() + b"\0"
        msg += b"\0"
        for queue in self._listeners:
            queue.put_nowait(msg)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        header, _, payload = data.partition(b"\0")
        method_arg, src, _dtype, dest = header.decode().split(" ", 3)
        method, _, arg = method_arg.partition("+")
        self.record.append((method, arg, src, dest, payload))
        if method == "admin.Events":
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            self._listeners.append(queue)
            writer.write(b"1\0\0connection-established\0\0")
            with contextlib.suppress(ConnectionError):
                while msg := await queue.get():
                    writer.write(msg)
                    await writer.drain()
            writer.close()
            return
        if dest in self.domains and method in {
            "admin.vm.Start",
            "admin.vm.Kill",
            "admin.vm.Shutdown",
        }:
            running = self.domains.get(dest, {}).get("power_state") == "Running"
            if method == "admin.vm.Start" and not running:
                if "no-start" not in self.domains[dest]["tags"]:
                    await self._power(dest, start=True)
            elif method != "admin.vm.Start" and running:
                await self._power(dest, start=False)
        writer.write(self._answer(method, dest, payload))
        writer.close()

    def _error(self, cls: str, msg: str) -> bytes:
        return b"2\0" + cls.encode() + b"\0\0" + msg.encode() + b"\0"

    def _answer(self, method: str, dest: str, payload: bytes) -> bytes:
        if method == "internal.GetSystemInfo":
            return b"0\0" + json.dumps({"domains": self.domains}).encode()
        if dest not in self.domains:
            return self._error("QubesVMNotFoundError", f"No such domain: {dest!r}")
        dom = self.domains[dest]
        if method == "admin.vm.Start":
            if dom["power_state"] == "Running":
                return self._error("QubesVMNotHaltedError", f"Domain is running: {dest!r}")
            if "no-start" in dom["tags"]:
                return self._error("QubesException", "start refused")
            dom["power_state"] = "Running"
            self._event(dest, "domain-start", start_guid="True")
            return b"0\0"
        if method in {"admin.vm.Kill", "admin.vm.Shutdown"}:
            if dom["power_state"] != "Running":
                return self._error("QubesVMNotStartedError", f"Domain is powered off: {dest!r}")
            dom["power_state"] = "Halted"
            self._event(dest, "domain-shutdown")
            if dom["type"] == "DispVM":
                del self.domains[dest]
                self._event("", "domain-delete", vm=dest)
            return b"0\0"
        if method == "admin.vm.Remove":
            if dom["power_state"] != "Halted":
                return self._error("QubesVMNotHaltedError", f"Domain is running: {dest!r}")
            del self.domains[dest]
            self._event("", "domain-delete", vm=dest)
            return b"0\0"
        if method == "admin.vm.CreateDisposable":
            if not dom["template_for_dispvms"]:
                return self._error("QubesException", "not a disposable template")
            self._disp_counter += 1
            name = f"disp{self._disp_counter}"
            new = domain("DispVM", tags=self.disposable_tags)
            self.domains[name] = new
            self.paths.private_dir(name).mkdir(parents=True, exist_ok=True)
            self._event("", "domain-add", vm=name)
            return b"0\0" + (f"uuid:{new['uuid']}" if payload == b"uuid" else name).encode()
        return b""


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


def with_fake(tmp_path: Path, body: Callable[[FakeQubesd], Awaitable[T]]) -> T:
    """Run ``body`` with a started fake qubesd under a fresh root."""

    async def main() -> T:
        fake = FakeQubesd(SimPaths(tmp_path / "root"))
        await fake.start()
        try:
            return await body(fake)
        finally:
            await fake.close()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for ``condition`` to hold, yielding to the event loop; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@dataclass
class Env:
    """A fake qubesd, a router on top of it, and helpers to call through the router."""

    paths: SimPaths
    fake: FakeQubesd
    router: Router
    operator: ScriptedOperator

    async def call(
        self, source: str, target: str, service: str, stdin: bytes = b"", timeout: float = 60
    ) -> CallResult:
        return await call(
            self.paths,
            source=source,
            target=target,
            service_and_arg=service,
            stdin=stdin,
            timeout=timeout,
        )

    def calls(self, method: str) -> list[tuple[str, str, str, str, bytes]]:
        return [r for r in self.fake.record if r[0] == method]

    def dom0_service(self, name: str, script: str) -> Path:
        self.paths.rpc_dir.mkdir(parents=True, exist_ok=True)
        path = self.paths.rpc_dir / name
        path.write_text(script)
        path.chmod(0o755)
        return path

    def set_policy(self, text: str) -> None:
        (self.paths.policy_dirs[-1] / "30-test.policy").write_text(text)


@contextlib.asynccontextmanager
async def emulated(
    tmp_path: Path,
    policy: str,
    answers: Sequence[str | None] = (),
    config: RouterConfig | None = None,
) -> AsyncIterator[Env]:
    """A fresh root with ``policy`` (plus the stock files), a fake qubesd and a router."""
    paths = SimPaths(tmp_path / "root")
    fake = FakeQubesd(paths)
    await fake.start()
    install_default_policy(paths)
    install_dom0_rpc(paths)
    (paths.policy_dirs[-1] / "30-test.policy").write_text(policy)
    operator = ScriptedOperator(list(answers))
    router = await start_router(paths, operator, config=config)
    try:
        await until(lambda: bool(fake._listeners))  # the router follows events
        yield Env(paths, fake, router, operator)
    finally:
        await router.close()
        await fake.close()


class Background:
    """An emulated router running on its own event loop thread for the whole module."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.env: Env | None = None
        self.thread = threading.Thread(target=self._run, args=(tmp_path,), daemon=True)

    def _run(self, tmp_path: Path) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()
            policy = "test.Echo * work dom0 allow\n"
            async with emulated(tmp_path, policy) as env:
                env.dom0_service("test.Echo", "#!/bin/sh\ncat\n")
                self.env = env
                self.ready.set()
                await self.stop.wait()

        self.loop.run_until_complete(main())

    def call(self, source: str, service: str, stdin: bytes) -> int:
        assert self.env is not None
        fut = asyncio.run_coroutine_threadsafe(
            call(
                self.env.paths,
                source=source,
                target="dom0",
                service_and_arg=service,
                stdin=stdin,
                timeout=30,
            ),
            self.loop,
        )
        return fut.result(timeout=60).exit_code

    @classmethod
    @contextlib.contextmanager
    def running(cls, tmp_path: Path) -> Iterator[Background]:
        bg = cls(tmp_path)
        bg.thread.start()
        assert bg.ready.wait(timeout=30), "router did not start"
        try:
            yield bg
        finally:
            bg.close()

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=30)


def test_fake_reports_system_info_and_errors_like_qubesd(tmp_path: Path) -> None:
    async def body(fake: FakeQubesd) -> None:
        client = QubesdClient(fake.paths)
        info = await client.system_info()
        assert info["domains"]["work"]["power_state"] == "Running"
        with pytest.raises(QubesdError) as exc:
            await client.call("nosuch", "admin.vm.Start")
        assert exc.value.exc_class == "QubesVMNotFoundError"
        await client.start("work")  # already running: accepted, as qrexec-daemon does
        assert fake.record[-1][:4] == ("admin.vm.Start", "", "dom0", "work")

    with_fake(tmp_path, body)


def test_event_stream_delivers_start_and_shutdown(tmp_path: Path) -> None:
    async def body(fake: FakeQubesd) -> list[tuple[str, str]]:
        client = QubesdClient(fake.paths)
        seen: list[tuple[str, str]] = []

        async def follow() -> None:
            async for event in client.events():
                seen.append((event.subject, event.name))
                if event.name == "domain-shutdown":
                    return

        task = asyncio.create_task(follow())
        await until(lambda: bool(fake._listeners))
        await client.start("vault")
        await client.kill("vault")
        await asyncio.wait_for(task, 10)
        return seen

    assert with_fake(tmp_path, body) == [
        ("", "connection-established"),
        ("vault", "domain-start"),
        ("vault", "domain-shutdown"),
    ]
