"""A running emulated qube is one long-lived sandbox (issue 8 §1): its processes live between
calls and die with it; pause freezes them; a sandbox that dies makes the qube halted; its
console log outlives it; nothing outlives the emulator. All through a real ``sim run``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.sim.machine import _Freezer
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient
from tests.emulator_process import RunningEmulator, start_emulator
from tests.waiting import host_pids_with, until

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    running = start_emulator(tmp_path_factory.mktemp("machines") / "root")
    try:
        yield running
    finally:
        running.stop()


def qrexec(
    paths: SimPaths, qube: str, command: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """dom0's ``qrexec-client -d QUBE USER:COMMAND`` of this emulator."""
    client = paths.root / "usr/lib/qubes/qrexec-client"
    return subprocess.run(
        [str(client), "-d", qube, command],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def admin(paths: SimPaths, qube: str, method: str, arg: str = "") -> bytes:
    return asyncio.run(QubesdClient(paths).call(qube, method, arg))


def power(paths: SimPaths, qube: str) -> str:
    line = admin(paths, qube, "admin.vm.List").decode()
    return line.split("state=", 1)[1].split()[0]


def started(paths: SimPaths, qube: str) -> None:
    if power(paths, qube) != "Running":
        admin(paths, qube, "admin.vm.Start")


SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', 8765)); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from the server\\n'); c.close()\n"
)
CLIENT = (
    "import socket\n"
    "s = socket.create_connection(('127.0.0.1', 8765), timeout=5)\n"
    "print(s.recv(100).decode(), end='')\n"
)


def test_a_server_started_in_one_call_answers_the_next(emu: RunningEmulator) -> None:
    paths = emu.paths
    started(paths, "work")
    (paths.private_dir("work") / "server.py").write_text(SERVER)
    (paths.private_dir("work") / "client.py").write_text(CLIENT)
    first = qrexec(
        paths, "work", "user:nohup /run/qubes-sim/python /rw/server.py >/dev/null 2>&1 &"
    )
    assert first.returncode == 0
    reply = b""
    for _ in range(100):  # the server needs a moment to listen
        second = qrexec(paths, "work", "user:/run/qubes-sim/python /rw/client.py")
        reply = second.stdout
        if second.returncode == 0:
            break
        time.sleep(0.05)
    assert reply == b"hello from the server\n"
    # /tmp is the running qube's, kept between calls too
    assert qrexec(paths, "work", "user:echo kept > /tmp/t").returncode == 0
    assert qrexec(paths, "work", "user:cat /tmp/t").stdout == b"kept\n"


def test_calls_run_as_the_requested_user_in_the_qube(emu: RunningEmulator) -> None:
    paths = emu.paths
    started(paths, "work")
    as_user = qrexec(paths, "work", "user:id -un; hostname; pwd")
    as_root = qrexec(paths, "work", "root:id -u")
    default = qrexec(paths, "work", "DEFAULT:QUBESRPC qubes.VMShell dom0", b"id -un\n")
    assert as_user.stdout.split() == [b"user", b"work", b"/home/user"]
    assert (as_root.stdout, default.stdout) == (b"0\n", b"user\n")
    assert qrexec(paths, "work", "nobody:true").returncode == 1
    failed = qrexec(paths, "work", "user:echo out; echo err >&2; exit 7")
    assert (failed.returncode, failed.stdout, failed.stderr) == (7, b"out\n", b"err\n")


def test_the_long_lived_sandbox_keeps_the_isolation(emu: RunningEmulator) -> None:
    paths = emu.paths
    started(paths, "work")
    (paths.private_dir("vault") / "secret").write_text("vault data")
    vault_secret = paths.private_dir("vault") / "secret"
    daemon_dir = paths.qrexec_daemon_sock("work").parent
    script = "\n".join(
        [
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
            f"cat {vault_secret} 2>&1",
            f"ls {paths.root} 2>&1",
            f"ls {daemon_dir} 2>&1",
            "touch /usr/x 2>/dev/null || echo ro",
            "cat /etc/shadow | wc -c",
            "env | grep -c PYTHONPATH",
        ]
    )
    # root in the qube cannot take the covers away, not even from a mount namespace of its own
    uncover = (
        "umount /etc/shadow 2>/dev/null && echo uncovered;"
        " umount /rw 2>/dev/null && echo unmounted;"
        " unshare -m sh -c 'umount /etc/shadow && echo uncovered-in-new-ns' 2>/dev/null;"
        " id -u; cat /etc/shadow 2>/dev/null | wc -c"
    )
    assert qrexec(paths, "work", f"root:{uncover}").stdout.split() == [b"0", b"0"]
    out = qrexec(paths, "work", f"root:{script}").stdout.decode()
    assert out.splitlines()[0] == "lo"
    assert "vault data" not in out
    assert out.count("No such file") >= 3
    assert out.splitlines()[-3:] == ["ro", "0", "0"]


def test_pause_freezes_the_processes_and_unpause_resumes_them(emu: RunningEmulator) -> None:
    paths = emu.paths
    started(paths, "work")
    counter = paths.private_dir("work") / "count"
    counter.unlink(missing_ok=True)
    loop = "n=0; while true; do n=$((n+1)); echo $n > /rw/count; sleep 0.02; done"
    qrexec(paths, "work", f"user:nohup sh -c '{loop}' >/dev/null 2>&1 &")
    until(counter.exists)

    def value() -> int:
        text = counter.read_text().strip()
        return int(text) if text else 0

    admin(paths, "work", "admin.vm.Pause")
    try:
        assert power(paths, "work") == "Paused"
        frozen = value()
        time.sleep(0.5)
        assert value() == frozen
    finally:
        admin(paths, "work", "admin.vm.Unpause")
    assert power(paths, "work") == "Running"
    until(lambda: value() > frozen + 3)


def test_shutdown_terminates_and_kill_ends_at_once(emu: RunningEmulator) -> None:
    paths = emu.paths
    started(paths, "personal")
    trap = (
        "trap 'echo termed > /rw/termed; exit 0' TERM; touch /rw/trapped;"
        " while true; do sleep 0.1; done"
    )
    (paths.private_dir("personal") / "trapped").unlink(missing_ok=True)
    qrexec(paths, "personal", f'user:nohup sh -c "{trap}" >/dev/null 2>&1 &')
    qrexec(paths, "personal", "user:nohup sleep 31337.41 >/dev/null 2>&1 &")
    until(lambda: host_pids_with(b"sleep\x0031337.41"))
    until((paths.private_dir("personal") / "trapped").exists)  # its trap is set
    admin(paths, "personal", "admin.vm.Shutdown", "wait")
    assert power(paths, "personal") == "Halted"
    assert (paths.private_dir("personal") / "termed").read_text() == "termed\n"
    assert host_pids_with(b"sleep\x0031337.41") == []
    assert not paths.qrexec_daemon_sock("personal").exists()

    started(paths, "personal")
    stubborn = "trap '' TERM; while true; do sleep 0.1; done"
    qrexec(paths, "personal", f'user:nohup sh -c "{stubborn}" 31337.42 >/dev/null 2>&1 &')
    until(lambda: host_pids_with(b"31337.42"))
    begun = time.monotonic()
    admin(paths, "personal", "admin.vm.Kill")
    assert time.monotonic() - begun < 3
    assert power(paths, "personal") == "Halted"
    assert host_pids_with(b"31337.42") == []


def test_a_sandbox_that_dies_halts_the_qube_and_fires_domain_shutdown(
    emu: RunningEmulator,
) -> None:
    paths = emu.paths
    started(paths, "vault")
    qrexec(paths, "vault", "root:echo before the crash >&2")

    async def crash_and_watch() -> list[str]:
        client = QubesdClient(paths)
        seen: list[str] = []

        async def follow() -> None:
            async for event in client.events():
                if event.subject == "vault":
                    seen.append(event.name)
                    if event.name == "domain-shutdown":
                        return

        watcher = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        # the qube's agent dies (as its init would in a crash): the whole sandbox ends
        await asyncio.to_thread(qrexec, paths, "vault", "root:kill -KILL $PPID")
        await asyncio.wait_for(watcher, 20)
        return seen

    seen = asyncio.run(crash_and_watch())
    assert "domain-stopped" in seen
    assert seen[-1] == "domain-shutdown"
    assert power(paths, "vault") == "Halted"
    log = paths.console_log("vault").read_text()
    assert "before the crash" in log
    assert "vault died" in log
    # and it starts again
    admin(paths, "vault", "admin.vm.Start")
    assert qrexec(paths, "vault", "user:echo back").stdout == b"back\n"


def test_a_disposable_sandbox_and_its_private_volume_go_when_it_is_killed(
    emu: RunningEmulator,
) -> None:
    paths = emu.paths
    name = admin(paths, "default-dvm", "admin.vm.CreateDisposable").decode()
    admin(paths, name, "admin.vm.Start")
    qrexec(paths, name, "user:echo data > /rw/file; nohup sleep 31337.43 >/dev/null 2>&1 &")
    assert (paths.private_dir(name) / "file").exists()
    until(lambda: host_pids_with(b"sleep\x0031337.43"))
    admin(paths, name, "admin.vm.Kill")
    assert host_pids_with(b"sleep\x0031337.43") == []
    assert not paths.qube_dir(name).exists()
    assert not (paths.machines_dir / f"{name}.pid").exists()


def test_no_sandbox_outlives_a_killed_emulator(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = start_emulator(root)
    paths = first.paths
    ghost: subprocess.Popen[bytes] | None = None
    try:
        admin(paths, "work", "admin.vm.Start")
        qrexec(paths, "work", "user:nohup sleep 31337.44 >/dev/null 2>&1 &")
        until(lambda: host_pids_with(b"sleep\x0031337.44"))
        # A sandbox --die-with-parent cannot reach: a bwrap started by someone else, recorded
        # in a pid file as the killed emulator's own would be. The next run must reap it.
        ghost = subprocess.Popen(
            ["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "sleep", "31337.45"],
            start_new_session=True,
        )
        until(lambda: host_pids_with(b"sleep\x0031337.45"))
        stat = Path(f"/proc/{ghost.pid}/stat").read_text().rsplit(")", 1)[-1].split()
        (paths.machines_dir / "ghost.pid").write_text(f"{ghost.pid} {stat[19]}\n")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        until(lambda: host_pids_with(b"sleep\x0031337.44") == [])  # --die-with-parent
        assert (paths.machines_dir / "work.pid").exists()  # left behind by the SIGKILL
        second = start_emulator(root)
        try:
            ghost.wait(timeout=10)
            # reaped before the new emulator served: its ready file waited for that
            assert host_pids_with(b"sleep\x0031337.45") == []
            assert not (paths.machines_dir / "ghost.pid").exists()
            assert not (paths.machines_dir / "work.pid").exists()  # work is not running now
            assert not paths.qrexec_daemon_sock("work").exists()
        finally:
            second.stop()
    finally:
        if first.proc.poll() is None:
            first.stop()
        if ghost is not None:  # a failed run must not leave it to the next one
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ghost.pid, signal.SIGKILL)
    assert list(paths.machines_dir.glob("*.pid")) == []  # a clean stop leaves none
    assert not _Freezer(paths, "work").base.exists()  # nor a freezer group


def test_sigterm_of_the_emulator_stops_every_sandbox(tmp_path: Path) -> None:
    emu = start_emulator(tmp_path / "root")
    admin(emu.paths, "work", "admin.vm.Start")
    qrexec(emu.paths, "work", "user:nohup sleep 31337.46 >/dev/null 2>&1 &")
    until(lambda: host_pids_with(b"sleep\x0031337.46"))
    emu.stop()
    assert host_pids_with(b"sleep\x0031337.46") == []
    assert list(emu.paths.machines_dir.glob("*.pid")) == []
    assert not _Freezer(emu.paths, "work").base.exists()
