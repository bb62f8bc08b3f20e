"""The emulator's hypervisor: one long-lived bubblewrap sandbox per running qube.

Starting a qube boots its *machine*: a sandbox built by :func:`qubes_mcp.sim.sandbox.bwrap_argv`
(the same isolation as every sandbox: pid, ipc, uts, network and user namespaces, the qube's
``/rw``, its hostname, host secrets hidden) whose first process is the qube's qrexec agent
(:mod:`qubes_mcp.sim.vm_files.qrexec_agent`). The agent inherits a listening socket bound on
the host at ``ROOT/run/qubes/qrexec.NAME`` (dom0's line into the qube; no qube sees that path)
and runs every call as a child inside, so processes outlive the call that started them.

Power follows the processes, and the processes follow power:

* shutdown: SIGTERM to every process of the sandbox (the agent passes it on and waits), SIGKILL
  to the sandbox's init after the grace period; kill: SIGKILL at once;
* pause: the cgroup v1 freezer when this host lets us use it, else SIGSTOP of the sandbox's
  whole process tree; unpause: thaw, or SIGCONT;
* a sandbox that dies by itself (its init or agent crashed, OOM) is reported to ``on_death``,
  which tells qubesd the qube halted (``domain-shutdown`` fires, as for a real domain).

The console log (``ROOT/var/log/xen/console/guest-NAME.log``) receives everything the sandbox
writes on stdout and stderr (the agent's log, every call's stderr), capped and rotated once, on
the host, so it survives the qube.

No sandbox outlives the emulator: bwrap runs with ``--die-with-parent``, :meth:`Hypervisor.close`
kills every machine, and each machine leaves a pid file (pid and start time of its bwrap) that
:meth:`Hypervisor.reap_leftovers` uses on the next start when the emulator was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.sandbox import SandboxError, bwrap_argv

log = logging.getLogger("qubes_mcp.sim.machine")

#: Shutdown grace: how long the qube's processes get between SIGTERM and SIGKILL.
SHUTDOWN_GRACE = 5.0
#: How long a machine may take to report its agent ready.
BOOT_TIMEOUT = 30.0
#: Console log size at which it is rotated to ``.1`` (one old file is kept).
CONSOLE_CAP = 1 << 20
FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")


class MachineError(Exception):
    """A qube's sandbox could not be started."""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children (host pids)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                text = Path(f"/proc/{current}/task/{task}/children").read_text(encoding="ascii")
            except OSError:
                continue
            for child in text.split():
                found.append(int(child))
                todo.append(int(child))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not yet exited (a zombie counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return text.rsplit(")", 1)[-1].split()[0] != "Z"


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat``: tells a pid from a later process that reused it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19]


class _Freezer:
    """A cgroup v1 freezer group for one machine, or nothing where the host does not allow
    one (then pause falls back to SIGSTOP)."""

    def __init__(self, paths: SimPaths, name: str) -> None:
        tag = hashlib.sha256(str(paths.root).encode()).hexdigest()[:12]
        self.base = FREEZER_ROOT / f"qubes-mcp-sim-{tag}"
        self.path = self.base / name

    def create(self) -> bool:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            return (self.path / "cgroup.procs").exists()
        except OSError:
            return False

    def set(self, state: str) -> bool:
        try:
            (self.path / "freezer.state").write_text(state)
        except OSError:
            return False
        return True

    def state(self) -> str:
        try:
            return (self.path / "freezer.state").read_text().strip()
        except OSError:
            return ""

    async def remove(self) -> None:
        """Remove the group once its last task has left it (exiting tasks take a moment)."""
        self.set("THAWED")
        for _ in range(250):
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return
            except OSError:
                await asyncio.sleep(0.02)
                continue
            return
        log.warning("freezer group %s still busy; left in place", self.path)


class Machine:
    """The sandbox of one running qube."""

    def __init__(self, paths: SimPaths, name: str, on_exit: Callable[[Machine, int], None]) -> None:
        self.paths = paths
        self.name = name
        self._on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.expected_exit = False
        self.paused = False
        self.exit_code: int | None = None
        self._freezer = _Freezer(paths, name)
        self._use_freezer = False
        self._console_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.exited = asyncio.Event()

    @property
    def pid_file(self) -> Path:
        return self.paths.machines_dir / f"{self.name}.pid"

    async def boot(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Start the sandbox and wait until its agent accepts calls."""
        sock_path = self.paths.qrexec_daemon_sock(self.name)
        sock_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(sock_path.parent, 0o700)
        self.paths.vm_router_dir(self.name).mkdir(parents=True, exist_ok=True)
        self.paths.machines_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ready_r, ready_w = os.pipe()
        try:
            listener.bind(str(sock_path))
            os.chmod(sock_path, 0o600)
            listener.listen(64)
            argv = bwrap_argv(
                self.paths,
                self.name,
                [
                    "-m",
                    "qubes_mcp.sim.vm_files.qrexec_agent",
                    f"--listen-fd={listener.fileno()}",
                    f"--ready-fd={ready_w}",
                    f"--grace={grace}",
                ],
                uid=1000,  # the agent is `user`; a root call enters a nested user namespace
                env={},
                new_session=True,
            )
            self._use_freezer = self._freezer.create()
            if self._use_freezer:
                # join the group before bwrap exists, so every process of the qube is in it
                argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                        str(self._freezer.path / "cgroup.procs"), *argv]  # fmt: skip
            await self._spawn(argv, listener.fileno(), ready_w)
        except SandboxError as exc:
            raise MachineError(str(exc)) from None
        finally:
            listener.close()  # the agent holds its copy
            os.close(ready_w)
        try:
            ready = await asyncio.wait_for(_read_byte(ready_r), BOOT_TIMEOUT)
        finally:
            os.close(ready_r)
        if ready != b"R":
            await self.kill()
            raise MachineError(
                f"the qrexec agent of {self.name!r} did not start; "
                f"see {self.paths.console_log(self.name)}"
            )

    async def _spawn(self, argv: list[str], listen_fd: int, ready_fd: int) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=(listen_fd, ready_fd),  # bwrap hands them on to the agent unchanged
            start_new_session=True,
        )
        pid = self.proc.pid
        self.pid_file.write_text(f"{pid} {_start_time(pid) or ''}\n", encoding="ascii")
        self._console_task = asyncio.create_task(self._console())
        self._watch_task = asyncio.create_task(self._watch())

    async def _console(self) -> None:
        """Copy the sandbox's output to the console log, rotating at :data:`CONSOLE_CAP`."""
        assert self.proc is not None and self.proc.stdout is not None
        path = self.paths.console_log(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        _append(path, f"--- {stamp} {self.name} started\n".encode())
        while chunk := await self.proc.stdout.read(65536):
            _append(path, chunk)

    async def _watch(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._console_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._console_task, 5)
        self.exit_code = code
        why = "stopped" if self.expected_exit else f"died (exit status {code})"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        _append(self.paths.console_log(self.name), f"--- {stamp} {self.name} {why}\n".encode())
        await self._cleanup()
        self.exited.set()
        self._on_exit(self, code)

    async def _cleanup(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.paths.qrexec_daemon_sock(self.name).unlink(missing_ok=True)
        if self._use_freezer or self._freezer.path.is_dir():
            await self._freezer.remove()

    def _tree(self) -> list[int]:
        return _descendants(self.proc.pid) if self.proc is not None else []

    def _init_pid(self) -> int | None:
        """The sandbox's pid-1 (bwrap's child): killing it ends every process inside."""
        if self.proc is None:
            return None
        kids = _descendants(self.proc.pid)
        return kids[0] if kids else None

    async def _wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """SIGTERM to every process, SIGKILL to the sandbox after ``grace`` seconds."""
        if self.proc is None or self.exited.is_set():
            return
        self.expected_exit = True
        if self.paused:
            await self.unpause()
        tree = self._tree()
        _signal_all(tree[1:], signal.SIGTERM)  # not bwrap's own init: it would end all at once
        if not await self._wait(grace + 1.0):
            await self.kill()

    async def kill(self) -> None:
        """End the sandbox at once."""
        if self.proc is None or self.exited.is_set():
            return
        self.expected_exit = True
        init = self._init_pid()
        _signal_all([init] if init is not None else [], signal.SIGKILL)
        _signal_all([self.proc.pid], signal.SIGKILL)
        if self.paused:  # a frozen process dies only once thawed
            await self.unpause()
        if not await self._wait(10.0):
            _signal_all(self._tree(), signal.SIGKILL)
            await self._wait(10.0)

    async def pause(self) -> None:
        if self.proc is None or self.paused:
            return
        if self._use_freezer and self._freezer.set("FROZEN"):
            for _ in range(500):
                if self._freezer.state() == "FROZEN":
                    break
                await asyncio.sleep(0.002)
        else:
            self._use_freezer = False
            _signal_all(self._tree(), signal.SIGSTOP)
        self.paused = True

    async def unpause(self) -> None:
        if self.proc is None or not self.paused:
            return
        if self._use_freezer:
            self._freezer.set("THAWED")
        else:
            _signal_all(self._tree(), signal.SIGCONT)
        self.paused = False


async def _read_byte(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        loop.remove_reader(fd)
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        if not done.done():
            done.set_result(data)

    loop.add_reader(fd, readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)


def _append(path: Path, data: bytes) -> None:
    """Append to the console log; past the cap the file becomes ``.1`` and a new one starts."""
    try:
        if path.exists() and path.stat().st_size + len(data) > CONSOLE_CAP:
            os.replace(path, path.with_name(path.name + ".1"))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, data[-CONSOLE_CAP:])
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("console log of %s: %s", path.name, exc)


class Hypervisor:
    """Every machine of one emulated dom0; what qubesd's power operations act on.

    ``on_death(name)`` is called when a machine ends without being asked to (crash, OOM):
    qubesd then records the qube as halted.
    """

    def __init__(self, paths: SimPaths, on_death: Callable[[str], None] | None = None) -> None:
        self.paths = paths
        self.on_death = on_death
        self.machines: dict[str, Machine] = {}
        self.grace = SHUTDOWN_GRACE

    def running(self, name: str) -> bool:
        machine = self.machines.get(name)
        return machine is not None and not machine.exited.is_set()

    async def start(self, name: str) -> None:
        if self.running(name):
            return
        machine = Machine(self.paths, name, self._exited)
        self.machines[name] = machine
        try:
            await machine.boot(self.grace)
        except BaseException:
            self.machines.pop(name, None)
            await machine.kill()
            if machine.proc is None:  # never spawned: nothing will clean up after it
                await machine._freezer.remove()
            raise

    def _exited(self, machine: Machine, code: int) -> None:
        if self.machines.get(machine.name) is machine:
            del self.machines[machine.name]
        if not machine.expected_exit:
            log.warning("qube %s: its sandbox died (exit status %s)", machine.name, code)
            if self.on_death is not None:
                self.on_death(machine.name)

    async def shutdown(self, name: str) -> None:
        machine = self.machines.get(name)
        if machine is not None:
            await machine.shutdown(self.grace)

    async def kill(self, name: str) -> None:
        machine = self.machines.get(name)
        if machine is not None:
            await machine.kill()

    async def pause(self, name: str) -> None:
        machine = self.machines.get(name)
        if machine is not None:
            await machine.pause()

    async def unpause(self, name: str) -> None:
        machine = self.machines.get(name)
        if machine is not None:
            await machine.unpause()

    async def close(self) -> None:
        """Kill every machine (the emulator is stopping)."""
        await asyncio.gather(*(m.kill() for m in list(self.machines.values())))
        with contextlib.suppress(OSError):
            _Freezer(self.paths, "x").base.rmdir()  # empty once every machine is gone

    def reap_leftovers(self) -> list[str]:
        """Kill the sandboxes a previous emulator on this root left behind (it was SIGKILLed
        and ``--die-with-parent`` did not reach them), remove their pid files, sockets and
        freezer groups. Returns the qube names whose sandbox was found alive."""
        reaped: list[str] = []
        killed: list[int] = []
        directory = self.paths.machines_dir
        for pid_file in sorted(directory.glob("*.pid")) if directory.is_dir() else []:
            name = pid_file.stem
            try:
                pid_text, _, started = pid_file.read_text(encoding="ascii").strip().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, started = 0, ""
            if pid > 0 and started and _start_time(pid) == started:
                tree = [pid, *_descendants(pid)]
                freezer = _Freezer(self.paths, name)
                _signal_all(tree, signal.SIGKILL)
                freezer.set("THAWED")
                killed += tree
                reaped.append(name)
                log.warning("reaped the sandbox of %s left by a previous run (pid %d)", name, pid)
            pid_file.unlink(missing_ok=True)
            self.paths.qrexec_daemon_sock(name).unlink(missing_ok=True)
        deadline = time.monotonic() + 10  # SIGKILL is asynchronous: see them gone
        while any(_alive(pid) for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.02)
        base = _Freezer(self.paths, "x").base
        groups = [g for g in base.iterdir() if g.is_dir()] if base.is_dir() else []
        for group in groups:  # whatever is still in a leftover group is a leftover too
            with contextlib.suppress(OSError, ValueError):
                pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                _signal_all(pids, signal.SIGKILL)
            with contextlib.suppress(OSError):
                (group / "freezer.state").write_text("THAWED")
        deadline = time.monotonic() + 10
        for group in groups:
            while True:
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove the leftover freezer group %s", group)
                        break
                    time.sleep(0.02)
        with contextlib.suppress(OSError):
            base.rmdir()
        return reaped
