"""Run commands "inside" an emulated qube: one bubblewrap sandbox per call.

A sandbox has no network and its own pid/ipc/uts (hostname = qube name) namespaces, sees the
host's system directories read-only, a fresh tmpfs on ``/tmp``, ``/run``, ``/var/tmp``, and
the qube's private volume read-write on ``/rw`` (``/home/user`` is ``/rw/home/user``). Bound
read-only: the Python interpreter the qube-side tools need and the ``qubes_mcp`` package (they
use its standard-library-only modules), and, when the router runs, this qube's own agent socket
at :data:`AGENT_SOCKET` — never the router's control socket or another qube's socket.

Every command enters through :mod:`qubes_mcp.sim.vm_files.agent`, the in-sandbox stand-in for
``qrexec-agent``: it creates the home directory, changes into it and executes the service or
command. Doing that inside the sandbox means no path the qube controls is ever resolved on the
host (a hostile qube may plant symlinks in its private volume).

Without a usable ``bwrap`` every call raises :class:`BwrapUnavailableError`; nothing ever runs on
the host instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import qubes_mcp
from qubes_mcp.sim.paths import SimPaths

BWRAP_REQUIRED_MESSAGE = (
    "bubblewrap (bwrap) is required to run commands in emulated qubes; "
    "install it (apt-get install bubblewrap)"
)

#: Inside-sandbox layout (all under the per-sandbox tmpfs ``/run``).
SIM_DIR = "/run/qubes-sim"
#: The router's per-qube directory (read-only) and, in it, the socket a qube calls out on.
ROUTER_DIR = f"{SIM_DIR}/router"
AGENT_SOCKET = f"{ROUTER_DIR}/agent.sock"
SHIM_BIN = f"{SIM_DIR}/lib/qubes_mcp/sim/vm_files/bin"
RPC_DIR = f"{SIM_DIR}/lib/qubes_mcp/sim/vm_files/rpc"
LIB_DIR = f"{SIM_DIR}/lib"
PYTHON = f"{SIM_DIR}/python"
SANDBOX_PATH = f"{SHIM_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"

#: Users a call may run as, with (uid, home). Policy ``user=`` other than these is refused.
USERS: Mapping[str, tuple[int, str]] = {"user": (1000, "/home/user"), "root": (0, "/root")}
_QUBE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")
_ENV_NAME = re.compile(r"\A[A-Z_][A-Z0-9_]*\Z")
#: the host's system, read-only; with its package database, so that a template's package
#: listing (``dpkg-query -W``, ``rpm -qa``) answers as a template's would (template.update)
_SYSTEM_DIRS = (
    *("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"),
    *("/var/lib/dpkg", "/var/lib/rpm"),
)


class SandboxError(Exception):
    """A sandboxed command could not be run (bad request or environment)."""


class BwrapUnavailableError(SandboxError):
    """bubblewrap is missing or cannot create namespaces here; we refuse rather than run on the
    host."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(BWRAP_REQUIRED_MESSAGE + (f" ({detail})" if detail else ""))


class SandboxTimeoutError(SandboxError):
    """The command outlived its timeout and was killed with its whole process tree."""


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


_bwrap_checked: str | None = None


def bwrap_path() -> str:
    """Path of a working ``bwrap``, probed once per process.

    Raises:
        BwrapUnavailableError: not installed, or cannot unshare namespaces on this machine.
    """
    global _bwrap_checked
    if _bwrap_checked is not None:
        return _bwrap_checked
    exe = shutil.which("bwrap")
    if exe is None:
        raise BwrapUnavailableError()
    try:
        probe = subprocess.run(
            [exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BwrapUnavailableError(str(exc)) from None
    if probe.returncode != 0:
        raise BwrapUnavailableError(probe.stderr.decode(errors="replace").strip()[:200])
    _bwrap_checked = exe
    return exe


def _python_binds() -> tuple[str, list[str]]:
    """The interpreter's real path and the bind arguments that make it usable inside."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    args: list[str] = []
    if not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    return interpreter, args


def _system_binds() -> list[str]:
    """Host system directories read-only, keeping merged-/usr symlinks as symlinks."""
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


#: Where host secrets may sit among the read-only system directories.
_SCANNED_FOR_PRIVATE = ("/etc",)


@functools.cache
def _private_host_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Host files and directories under /etc that other users may not read.

    In the user namespace a sandbox's users map to the user running the emulator, so they
    would read whatever that user can (as root: /etc/shadow, TLS keys, …). Each such file is
    covered with /dev/null and each such directory with an empty tmpfs: a qube sees only what
    any unprivileged user of the host would see. Scanned once per process.
    """
    files: list[str] = []
    dirs: list[str] = []
    for top in _SCANNED_FOR_PRIVATE:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in list(dirnames):
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o005 != 0o005:
                        dirs.append(path)
                        dirnames.remove(name)  # its contents are hidden with it
            for name in filenames:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o004:
                        files.append(path)
    return tuple(files), tuple(dirs)


def _identity_files(paths: SimPaths, name: str) -> list[str]:
    """Bind arguments giving the qube its own ``/etc/passwd``, ``/etc/group``, ``/etc/hostname``
    (written by us under ``ROOT/run/qrexec/etc/<qube>``, never under the qube's control), and
    hiding the host's private files."""
    etc = paths.run / "qrexec" / "etc" / name
    etc.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
        "user:x:1000:1000:user:/home/user:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": "root:x:0:\nuser:x:1000:\nqubes:x:98:user\nnogroup:x:65534:\n",
        "hostname": f"{name}\n",
    }
    args: list[str] = []
    for filename, content in files.items():
        own = etc / filename
        if not own.exists() or own.read_text(encoding="utf-8") != content:
            own.write_text(content, encoding="utf-8")
        args += ["--ro-bind", str(own), f"/etc/{filename}"]
    private_files, private_dirs = _private_host_paths()
    for hidden in private_files:
        args += ["--ro-bind", "/dev/null", hidden]
    for hidden in private_dirs:
        args += ["--tmpfs", hidden]
    return args


def _checked_private_dir(paths: SimPaths, name: str) -> Path:
    """The qube's private volume, refusing anything but a real directory (not a symlink)."""
    private = paths.private_dir(name)
    try:
        st = os.lstat(private)
    except FileNotFoundError:
        raise SandboxError(f"qube {name!r} has no private volume at {private}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(f"private volume of {name!r} is not a directory")
    if st.st_mode & 0o077:
        # Inside, the qube's users own its files as the emulator's user does outside; a qube can
        # thus leave setuid files there. Nobody else on the host may reach them.
        os.chmod(private, 0o700)
    return private


def bwrap_argv(
    paths: SimPaths,
    name: str,
    python_args: Sequence[str],
    *,
    uid: int,
    env: Mapping[str, str],
    new_session: bool,
) -> list[str]:
    """The ``bwrap`` command line of one sandbox of qube ``name`` running the bundled Python
    with ``python_args``: the one place that decides what a qube sees (used by the per-call
    sandbox and by the long-lived one of :mod:`qubes_mcp.sim.machine` alike).

    ``new_session`` puts the sandbox in its own session (no controlling terminal, so no
    ``TIOCSTI`` into the caller's); the long-lived sandbox's agent does that per call instead.
    """
    if not _QUBE_NAME.match(name):
        raise SandboxError(f"invalid qube name {name!r}")
    private = _checked_private_dir(paths, name)
    bwrap = bwrap_path()
    interpreter, python_binds = _python_binds()
    package_dir = str(Path(qubes_mcp.__file__).resolve().parent)
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-net",
        "--die-with-parent",
        *(["--new-session"] if new_session else []),
        "--hostname",
        name,
        "--uid",
        str(uid),
        "--gid",
        str(uid),
        # uid 0 would otherwise hold every capability inside its namespaces, enough to unmount
        # the covers below and read what they hide; with none it is only uid 0
        "--cap-drop",
        "ALL",
        *_system_binds(),
        *_identity_files(paths, name),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",  # noqa: S108 - a fresh tmpfs inside the sandbox, not the host's /tmp
        "--tmpfs",
        "/var/tmp",  # noqa: S108 - likewise
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/root",
        "--bind",
        str(private),
        "/rw",
        # A symlink resolved inside the sandbox, so a hostile /rw/home cannot redirect a
        # host-side bind mount.
        "--dir",
        "/home",
        "--symlink",
        "/rw/home/user",
        "/home/user",
        *python_binds,
        "--symlink",
        interpreter,
        PYTHON,
        "--ro-bind",
        package_dir,
        f"{LIB_DIR}/qubes_mcp",
    ]
    router_dir = paths.vm_router_dir(name)
    if router_dir.is_dir():
        # read-only: the qube may connect to the router's socket for it, never replace it
        argv += ["--ro-bind", str(router_dir), ROUTER_DIR]
    full_env = {
        "PATH": SANDBOX_PATH,
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": LIB_DIR,  # removed again by the agent before it runs anything
        **env,
    }
    argv.append("--clearenv")
    for key, value in full_env.items():
        if not _ENV_NAME.match(key) or "\0" in value:
            raise SandboxError(f"invalid environment entry {key!r}")
        argv += ["--setenv", key, value]
    argv += ["--", PYTHON, "-B", "-s", *python_args]
    return argv


class QubeSandbox:
    """Runs commands inside one qube and tracks them so shutdown can kill them all."""

    def __init__(self, paths: SimPaths, name: str) -> None:
        if not _QUBE_NAME.match(name):
            raise SandboxError(f"invalid qube name {name!r}")
        self.paths = paths
        self.name = name
        self._procs: set[asyncio.subprocess.Process] = set()

    @property
    def running(self) -> int:
        """How many sandboxed processes of this qube are alive."""
        return sum(1 for p in self._procs if p.returncode is None)

    def bwrap_argv(
        self, inner: Sequence[str], *, user: str = "user", env: Mapping[str, str] | None = None
    ) -> list[str]:
        """The full ``bwrap`` command line running ``inner`` through the in-sandbox agent."""
        if user not in USERS:
            raise SandboxError(f"unknown user {user!r} in qube {self.name!r}")
        uid, home = USERS[user]
        full_env = {
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            **(env or {}),
        }
        return bwrap_argv(
            self.paths,
            self.name,
            ["-m", "qubes_mcp.sim.vm_files.agent", *inner],
            uid=uid,
            env=full_env,
            new_session=True,
        )

    async def spawn(
        self, inner: Sequence[str], *, user: str = "user", env: Mapping[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        """Start ``inner`` with pipes on stdin/stdout/stderr; the caller streams them."""
        argv = self.bwrap_argv(inner, user=user, env=env)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # one process group to kill on shutdown
        )
        self._procs.add(proc)
        return proc

    def forget(self, proc: asyncio.subprocess.Process) -> None:
        self._procs.discard(proc)

    async def run(
        self,
        inner: Sequence[str],
        *,
        user: str = "user",
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
        timeout: float = 60.0,
    ) -> SandboxResult:
        """Run ``inner`` to completion, feeding ``stdin``.

        Raises:
            SandboxTimeoutError: after killing the whole sandbox when ``timeout`` passed.
        """
        proc = await self.spawn(inner, user=user, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            self.kill(proc)
            await proc.wait()
            raise SandboxTimeoutError(f"command in {self.name!r} timed out") from None
        finally:
            self.forget(proc)
        assert proc.returncode is not None
        return SandboxResult(proc.returncode, out, err)

    async def run_service(
        self,
        service_and_arg: str,
        *,
        source: str,
        user: str = "user",
        stdin: bytes = b"",
        timeout: float = 60.0,
    ) -> SandboxResult:
        """Run a qube-side qrexec service as the agent would for a call from ``source``."""
        return await self.run(
            ["service", service_and_arg],
            user=user,
            env=service_env(service_and_arg, source),
            stdin=stdin,
            timeout=timeout,
        )

    def kill(self, proc: asyncio.subprocess.Process) -> None:
        """Kill one sandboxed command with every process it started.

        The sandbox's init (bwrap's child, pid 1 of the pid namespace) is killed first: the
        kernel then ends every process in the namespace, and the outer bwrap reaps it and
        exits by itself. Killing the outer bwrap first would orphan that child, and where the
        host's pid 1 does not reap orphans (containers) it would stay a zombie. The process
        group is killed too, a moment later, in case anything is left.
        """
        if proc.returncode is not None:
            return
        children = _children(proc.pid)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if children and loop is not None:
            loop.call_later(_KILL_GRACE, _killpg_if_running, proc)
        else:
            _killpg_if_running(proc)

    def kill_all(self) -> None:
        """Kill every sandboxed process of this qube (qube shutdown or removal)."""
        for proc in list(self._procs):
            self.kill(proc)


#: How long the outer bwrap gets to exit after its child was killed.
_KILL_GRACE = 2.0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _killpg_if_running(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def service_env(service_and_arg: str, source: str) -> dict[str, str]:
    """The ``QREXEC_*`` variables a qube-side service gets (QX ``libqrexec/exec.c``).

    In a qube the command has no requested-target part, so the type is empty.
    """
    # The router always forwards ``service+arg`` with a ``+`` (an empty argument is ``+``), so
    # QREXEC_SERVICE_ARGUMENT is always set, possibly empty, as in real qrexec.
    service, _, arg = service_and_arg.partition("+")
    return {
        "QREXEC_SERVICE_FULL_NAME": f"{service}+{arg}",
        "QREXEC_SERVICE_ARGUMENT": arg,
        "QREXEC_REMOTE_DOMAIN": source,
        "QREXEC_REQUESTED_TARGET_TYPE": "",
    }
