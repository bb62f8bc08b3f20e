"""The hypervisor in process: the SIGSTOP fallback where no cgroup freezer is usable, the
console log's cap and rotation, and the agent's answers to malformed requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qubes_mcp.sim import machine as machine_mod
from qubes_mcp.sim.machine import Hypervisor
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec import wire

pytestmark = pytest.mark.bwrap


async def agent_call(paths: SimPaths, name: str, command: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(paths.qrexec_daemon_sock(name)))
    writer.write(wire.encode_frame(wire.REQUEST, command) + wire.encode_frame(wire.STDIN))
    out = err = b""
    try:
        while True:
            frame = await asyncio.wait_for(wire.read_frame(reader), 30)
            assert frame is not None
            kind, data = frame
            if kind == wire.STDOUT:
                out += data
            elif kind == wire.STDERR:
                err += data
            else:
                assert kind == wire.EXIT
                return wire.decode_exit(data), out, err
    finally:
        writer.close()


def machine_test(tmp_path: Path, body) -> None:  # type: ignore[no-untyped-def]
    paths = SimPaths(tmp_path / "root")
    paths.private_dir("work").mkdir(parents=True)
    deaths: list[str] = []

    async def main() -> None:
        hv = Hypervisor(paths, on_death=deaths.append)
        await hv.start("work")
        try:
            await body(paths, hv)
        finally:
            await hv.close()
        assert deaths == []

    asyncio.run(main())


def test_pause_without_a_freezer_stops_and_continues_the_whole_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine_mod._Freezer, "create", lambda self: False)

    async def body(paths: SimPaths, hv: Hypervisor) -> None:
        loop = "n=0; while true; do n=$((n+1)); echo $n > /rw/count; sleep 0.02; done"
        await agent_call(paths, "work", f"user:nohup sh -c '{loop}' >/dev/null 2>&1 &".encode())
        counter = paths.private_dir("work") / "count"
        for _ in range(200):
            if counter.exists() and counter.read_text().strip():
                break
            await asyncio.sleep(0.05)
        await hv.pause("work")
        frozen = counter.read_text()
        await asyncio.sleep(0.5)
        assert counter.read_text() == frozen
        await hv.unpause("work")
        await asyncio.sleep(0.5)
        assert int(counter.read_text()) > int(frozen) + 3

    machine_test(tmp_path, body)


def test_the_console_log_is_capped_and_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(machine_mod, "CONSOLE_CAP", 4096)

    async def body(paths: SimPaths, hv: Hypervisor) -> None:
        noise = "head -c 3000 /dev/zero | tr '\\0' x >&2; echo >&2"
        for _ in range(4):
            code, _out, err = await agent_call(paths, "work", f"user:{noise}".encode())
            assert code == 0 and len(err) == 3001  # the caller still gets all of it
        log = paths.console_log("work")
        rotated = log.with_name(log.name + ".1")
        assert log.stat().st_size <= 4096
        assert rotated.exists() and rotated.stat().st_size <= 4096

    machine_test(tmp_path, body)


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (b"no-colon", 1, b"USER:COMMAND"),
        (b"admin:true", 1, b"does not exist"),
        (b"user:QUBESRPC qubes.NoSuch dom0", 127, b"not found"),
        (b"user:QUBESRPC qubes.VMShell", 1, b"SERVICE+ARG SOURCE"),
        (b"user:QUBESRPC ../../bin/sh dom0", 127, b"not found"),
        (b"\xff:true", 1, b"UTF-8"),
    ],
)
def test_the_agent_refuses_malformed_requests_and_keeps_serving(
    tmp_path: Path, command: bytes, code: int, message: bytes
) -> None:
    async def body(paths: SimPaths, hv: Hypervisor) -> None:
        got, out, err = await agent_call(paths, "work", command)
        assert (got, out) == (code, b"")
        assert message in err
        assert await agent_call(paths, "work", b"user:echo ok") == (0, b"ok\n", b"")

    machine_test(tmp_path, body)


def test_a_stopped_machine_leaves_no_freezer_group(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path / "root")
    paths.private_dir("work").mkdir(parents=True)
    group = machine_mod._Freezer(paths, "work")

    async def main() -> None:
        hv = Hypervisor(paths)
        await hv.start("work")
        if not group.path.is_dir():
            await hv.close()
            pytest.skip("no usable cgroup v1 freezer here (pause uses SIGSTOP)")
        await hv.kill("work")
        assert not group.path.exists()
        await hv.start("work")
        await hv.close()
        assert not group.base.exists()

    asyncio.run(main())
