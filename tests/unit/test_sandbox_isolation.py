"""A qube's sandbox: what it can see, reach and change, and that it dies with its qube."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from qubes_mcp.sim import sandbox as sandbox_mod
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.sandbox import (
    BWRAP_REQUIRED_MESSAGE,
    BwrapUnavailableError,
    QubeSandbox,
    SandboxError,
    SandboxResult,
    SandboxTimeoutError,
)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await coro

    return asyncio.run(wrapper())


@pytest.fixture
def paths(tmp_path: Path) -> SimPaths:
    p = SimPaths(tmp_path / "root")
    for name in ("work", "vault"):
        p.private_dir(name).mkdir(parents=True)
    return p


def sh(paths: SimPaths, script: str, *, qube: str = "work", user: str = "user") -> SandboxResult:
    return run(
        QubeSandbox(paths, qube).run_service(
            "qubes.VMShell", source="dom0", user=user, stdin=script.encode(), timeout=60
        )
    )


def host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.bwrap
def test_captures_stdout_stderr_exit_code_and_feeds_stdin(paths: SimPaths) -> None:
    result = run(
        QubeSandbox(paths, "work").run(
            ["exec", "sh", "-c", "read line; echo out-$line; echo err >&2; exit 7"],
            stdin=b"hello\n",
        )
    )
    assert result == SandboxResult(7, b"out-hello\n", b"err\n")


@pytest.mark.bwrap
def test_hostname_and_identity_are_the_qubes(paths: SimPaths) -> None:
    result = sh(paths, "hostname; id -un; id -u; echo $HOME; pwd")
    assert result.stdout.decode().split() == ["work", "user", "1000", "/home/user", "/home/user"]


@pytest.mark.bwrap
def test_policy_user_root_runs_as_uid_0(paths: SimPaths) -> None:
    assert sh(paths, "id -u", user="root").stdout == b"0\n"


def test_unknown_user_is_refused(paths: SimPaths) -> None:
    with pytest.raises(SandboxError, match="unknown user"):
        QubeSandbox(paths, "work").bwrap_argv(["exec", "true"], user="admin")


@pytest.mark.bwrap
def test_no_network_not_even_host_loopback(paths: SimPaths) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        script = (
            "python3 -c 'import socket,sys\n"
            "s=socket.socket(); s.settimeout(5)\n"
            f'sys.exit(s.connect_ex(("127.0.0.1", {port})))\' || echo blocked\n'
            "ls /sys/class/net 2>/dev/null || cat /proc/net/dev | tail -n +3 | cut -d: -f1\n"
        )
        result = sh(paths, script.replace("python3", sandbox_mod.PYTHON))
    lines = result.stdout.decode().split()
    assert lines[0] == "blocked"
    assert lines[1:] == ["lo"]


@pytest.mark.bwrap
def test_other_qubes_and_emulator_files_are_invisible(paths: SimPaths) -> None:
    secret = paths.private_dir("vault") / "secret"
    secret.write_text("vault data")
    result = sh(paths, f"cat {secret}; ls {paths.root}; ls /rw")
    assert b"vault data" not in result.stdout
    assert b"No such file" in result.stderr
    assert b"secret" not in result.stdout


@pytest.mark.bwrap
def test_cannot_reach_router_control_socket(paths: SimPaths) -> None:
    paths.router_sock.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(paths.router_sock))
        listener.listen()
        script = (
            f"{sandbox_mod.PYTHON} -c 'import socket\n"
            f'socket.socket(socket.AF_UNIX).connect("{paths.router_sock}")\' 2>&1 | tail -1'
        )
        result = sh(paths, script)
    assert b"FileNotFoundError" in result.stdout


@pytest.mark.parametrize("user", ["user", "root"])
@pytest.mark.bwrap
def test_host_system_is_read_only(paths: SimPaths, user: str) -> None:
    result = sh(
        paths, "for d in /usr /etc /bin; do touch $d/qmcp-x 2>/dev/null || echo ro; done", user=user
    )
    assert result.stdout == b"ro\nro\nro\n"
    assert not Path("/usr/qmcp-x").exists()


@pytest.mark.bwrap
def test_host_files_other_users_cannot_read_are_hidden(paths: SimPaths) -> None:
    private = [p for p in sandbox_mod._private_host_paths()[0] if os.path.getsize(p) > 0]
    if not private:
        pytest.skip("this host has no non-empty private files under /etc")
    script = "".join(f"cat {p} 2>/dev/null | wc -c\n" for p in private[:5])
    result = sh(paths, script, user="root")
    assert result.stdout.split() == [b"0"] * len(private[:5])
    assert "/etc/shadow" in sandbox_mod._private_host_paths()[0] or not Path("/etc/shadow").exists()


@pytest.mark.bwrap
def test_root_cannot_uncover_what_is_hidden(paths: SimPaths) -> None:
    """uid 0 in the sandbox holds no capability: the covers over host secrets stay."""
    script = (
        "grep CapEff /proc/self/status\n"
        "umount /etc/shadow 2>/dev/null && echo uncovered\n"
        "umount /rw 2>/dev/null && echo unmounted\n"
        "mount -t tmpfs x /tmp 2>/dev/null && echo mounted\n"
    )
    result = sh(paths, script, user="root")
    assert result.stdout.decode().split() == ["CapEff:", "0000000000000000"]


@pytest.mark.bwrap
def test_environment_is_clean(paths: SimPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMCP_HOST_SECRET", "leak")
    result = sh(paths, "env")
    assert b"QMCP_HOST_SECRET" not in result.stdout
    assert b"PYTHONPATH" not in result.stdout
    assert b"QREXEC_REMOTE_DOMAIN=dom0" in result.stdout


@pytest.mark.bwrap
def test_private_home_persists_and_tmp_does_not(paths: SimPaths) -> None:
    sh(paths, "echo kept > ~/note; echo gone > /tmp/t")
    result = sh(paths, "cat ~/note; cat /tmp/t 2>/dev/null || echo no-tmp")
    assert result.stdout == b"kept\nno-tmp\n"
    assert (paths.private_dir("work") / "home/user/note").read_text() == "kept\n"


@pytest.mark.bwrap
def test_hostile_home_symlink_does_not_reach_host(paths: SimPaths, tmp_path: Path) -> None:
    victim = tmp_path / "host-victim"
    victim.mkdir()
    sh(paths, f"rm -rf /rw/home; ln -s {victim} /rw/home")
    sh(paths, "echo pwned > ~/x 2>/dev/null; true")
    assert list(victim.iterdir()) == []


@pytest.mark.bwrap
def test_private_volume_is_closed_to_other_host_users(paths: SimPaths) -> None:
    paths.private_dir("work").chmod(0o755)
    result = sh(paths, "cp /bin/true ~/suid && chmod 4755 ~/suid && echo made")
    assert result.stdout == b"made\n"  # a qube may do this to its own files...
    # ...but no other host user can reach them
    assert paths.private_dir("work").stat().st_mode & 0o777 == 0o700


def test_private_volume_that_is_a_symlink_is_refused(paths: SimPaths, tmp_path: Path) -> None:
    private = paths.private_dir("work")
    private.rmdir()
    private.symlink_to(tmp_path)
    with pytest.raises(SandboxError, match="not a directory"):
        QubeSandbox(paths, "work").bwrap_argv(["exec", "true"])


@pytest.mark.bwrap
def test_timeout_kills_the_whole_tree(paths: SimPaths) -> None:
    marker = "31337.25"
    with pytest.raises(SandboxTimeoutError):
        run(
            QubeSandbox(paths, "work").run(
                ["exec", "sh", "-c", f"sleep {marker} & sleep {marker}"], timeout=1
            )
        )
    assert host_processes_with(f"sleep\0{marker}") == []


@pytest.mark.bwrap
def test_kill_all_ends_every_process_of_the_qube(paths: SimPaths) -> None:
    marker = "31337.75"

    async def main() -> int | None:
        sandbox = QubeSandbox(paths, "work")
        proc = await sandbox.spawn(["exec", "sh", "-c", f"sleep {marker} & sleep {marker}"])
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while not host_processes_with(f"sleep\0{marker}"):
                await asyncio.sleep(0.05)
            assert sandbox.running == 1
            sandbox.kill_all()
            return await proc.wait()

    assert run(main()) is not None
    assert host_processes_with(f"sleep\0{marker}") == []


def test_without_bwrap_nothing_runs(paths: SimPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_mod, "_bwrap_checked", None)
    monkeypatch.setattr(sandbox_mod.shutil, "which", lambda _name: None)
    marker = paths.root / "ran-on-host"
    with pytest.raises(BwrapUnavailableError) as exc:
        run(QubeSandbox(paths, "work").run(["exec", "touch", str(marker)]))
    assert str(exc.value) == BWRAP_REQUIRED_MESSAGE
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../vault", "", "a b", "-x", "x" * 40], ids=repr)
def test_invalid_qube_names_refused(paths: SimPaths, name: str) -> None:
    with pytest.raises(SandboxError):
        QubeSandbox(paths, name)
