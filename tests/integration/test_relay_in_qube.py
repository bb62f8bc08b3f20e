"""The gate's relay ends commands *in the qube* (issue 11 §4): the timeout, a cancelled relay
(gate shutdown) and the reaping of a previous gate's runs all kill the command's processes
inside, through dom0's qrexec-client line of a real ``sim run``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.dom0 import relay
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient
from tests.emulator_process import RunningEmulator, start_emulator
from tests.waiting import host_pids_with

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    running = start_emulator(tmp_path_factory.mktemp("relay") / "root")
    try:
        asyncio.run(QubesdClient(running.paths).start("work"))
        yield running
    finally:
        running.stop()


def client(emu: RunningEmulator) -> Path:
    return emu.paths.root / "usr/lib/qubes/qrexec-client"


async def wait_for(marker: bytes, present: bool, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while bool(host_pids_with(marker)) != present:
        assert time.monotonic() < deadline, f"{marker!r} present={not present} still"
        await asyncio.sleep(0.05)


def test_a_command_runs_with_its_bytes_and_exit_code(emu: RunningEmulator) -> None:
    result = asyncio.run(
        relay.run_command(
            client(emu),
            "work",
            ["sh", "-c", 'read x; echo "out $x $QMCP_RUN_ID"; echo err >&2; exit 3', "-x"],
            stdin=b"in\n",
            timeout=30,
            limit=1 << 20,
        )
    )
    assert (result.exit_code, result.timed_out) == (3, False)
    assert result.stdout == f"out in {result.run_id}\n".encode()
    assert result.stderr == b"err\n"


def test_odd_words_reach_the_command_unchanged(emu: RunningEmulator) -> None:
    words = ["-n", "a b", "$HOME", "`id`", "x;y", "ü", "--", ""]
    result = asyncio.run(
        relay.run_command(
            client(emu), "work", ["printf", "%s|", *words], stdin=b"", timeout=30, limit=4096
        )
    )
    assert result.stdout.decode() == "".join(f"{w}|" for w in words)


def test_the_timeout_kills_the_command_inside_the_qube(emu: RunningEmulator) -> None:
    begun = time.monotonic()
    result = asyncio.run(
        relay.run_command(
            client(emu),
            "work",
            ["sh", "-c", "sleep 31337.51 & sleep 31337.51; echo never"],
            stdin=b"",
            timeout=1,
            limit=4096,
        )
    )
    assert result.timed_out and result.exit_code is None
    assert result.stdout == b""
    assert time.monotonic() - begun < 1 + relay.KILL_AFTER + relay.DOM0_MARGIN
    assert host_pids_with(b"sleep\x0031337.51") == []


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(emu: RunningEmulator) -> None:
    result = asyncio.run(
        relay.run_command(
            client(emu),
            "work",
            ["sh", "-c", "trap '' TERM; sleep 31337.52 & wait; wait"],
            stdin=b"",
            timeout=1,
            limit=4096,
        )
    )
    assert result.timed_out
    assert host_pids_with(b"sleep\x0031337.52") == []


def test_a_cancelled_relay_kills_the_command_in_the_qube(emu: RunningEmulator) -> None:
    """The gate stopping while a command runs: its task is cancelled."""

    async def main() -> None:
        task = asyncio.create_task(
            relay.run_command(
                client(emu),
                "work",
                ["sh", "-c", "setsid sleep 31337.53 & sleep 31337.53"],
                stdin=b"",
                timeout=600,
                limit=4096,
            )
        )
        await wait_for(b"sleep\x0031337.53", True)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # even the process that left the command's process group (setsid) carries the marker
        assert host_pids_with(b"sleep\x0031337.53") == []

    asyncio.run(main())


def test_runs_a_previous_gate_left_behind_are_reaped_and_others_kept(
    emu: RunningEmulator,
) -> None:
    """A restarted gate passes the ids its journal shows unfinished: only those die."""

    async def main() -> None:
        argv = relay.run_argv(
            client(emu), "work", ["sleep", "31337.54"], run_id="old-run-1", timeout=600, user="root"
        )
        orphan = await asyncio.create_subprocess_exec(*argv, start_new_session=True)
        keep = relay.run_argv(
            client(emu), "work", ["sleep", "31337.55"], run_id="other-run", timeout=600, user="root"
        )
        kept = await asyncio.create_subprocess_exec(*keep, start_new_session=True)
        await wait_for(b"sleep\x0031337.54", True)
        await wait_for(b"sleep\x0031337.55", True)
        orphan.kill()  # the old gate's line is gone; the command in the qube is not
        await orphan.wait()
        await asyncio.sleep(0.2)
        assert host_pids_with(b"sleep\x0031337.54") != []
        assert await relay.cancel_in_qube(client(emu), "work", ["old-run-1"])
        await wait_for(b"sleep\x0031337.54", False)
        assert host_pids_with(b"sleep\x0031337.55") != []
        assert await relay.cancel_in_qube(client(emu), "work", ["other-run"])
        await kept.wait()

    asyncio.run(main())


def test_a_qube_that_is_not_running_is_an_error_not_a_hang(emu: RunningEmulator) -> None:
    result = asyncio.run(
        relay.run_command(client(emu), "vault", ["true"], stdin=b"", timeout=30, limit=4096)
    )
    assert result.exit_code == 1
    assert b"cannot connect" in result.stderr


def python_client(emu: RunningEmulator, tmp_path: Path) -> Path:
    """The Python twin of the compiled client, as ``install`` writes it without a compiler."""
    import sys

    script = tmp_path / "qrexec-client.py"
    src = Path(relay.__file__).resolve().parents[2]
    script.write_text(
        f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {str(src)!r})\n"
        "from qubes_mcp.sim.dom0_tools.qrexec_client import main\n"
        f"sys.exit(main(root={str(emu.paths.root)!r}))\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["-d", "work", "user:cat; echo err >&2; exit 300"], b"in" * 50000),
        (["-d", "work", "root:head -c 300000 /dev/zero | tr '\\0' y"], b""),
        (["-T", "-t", "-d", "work", "DEFAULT:QUBESRPC qubes.VMShell dom0"], b"id -un\n"),
        (["-d", "work", "user:QUBESRPC qubes.NoSuch dom0"], b""),
        (["-d", "vault", "user:true"], b""),
        (["-d", "../x", "user:true"], b""),
        (["-d", "work"], b""),
    ],
)
def test_the_compiled_client_and_its_python_twin_agree(
    emu: RunningEmulator, tmp_path: Path, args: list[str], stdin: bytes
) -> None:
    import shutil
    import subprocess

    if shutil.which("cc") or shutil.which("gcc"):
        assert client(emu).read_bytes()[:4] == b"\x7fELF"  # sim run compiled it
    compiled = subprocess.run(
        [str(client(emu)), *args], input=stdin, capture_output=True, timeout=60, check=False
    )
    twin = subprocess.run(
        [str(python_client(emu, tmp_path)), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (compiled.returncode, compiled.stdout) == (twin.returncode, twin.stdout)
    assert compiled.stderr.split(b":")[0] == twin.stderr.split(b":")[0]
