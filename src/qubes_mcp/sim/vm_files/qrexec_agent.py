"""The long-lived qrexec agent of an emulated qube: one per running qube, inside its sandbox.

A real qube runs ``qrexec-agent``: dom0's qrexec-daemon hands it each call over vchan, and it
runs the command as a child of its own, relaying stdin, stdout, stderr and the exit code. Here
the emulator's hypervisor (:mod:`qubes_mcp.sim.machine`) starts this module as the sandbox's
first process with a listening Unix socket already open on ``--listen-fd`` (it was bound on
the host, at a path no qube can see, so a qube can neither replace nor redirect it), and every
connection on it is one call, in :mod:`qubes_mcp.sim.qrexec.wire` frames:

* host → agent: one ``REQUEST`` frame holding the command line exactly as ``qrexec-client``
  gives it: ``USER:COMMAND`` runs ``/bin/sh -c COMMAND`` as USER; ``USER:QUBESRPC
  SERVICE+ARG SOURCE`` runs the qube-side service as USER for a call from SOURCE (lookup and
  ``QREXEC_*`` variables as :mod:`~qubes_mcp.sim.vm_files.agent` does; ``DEFAULT`` is
  ``user``; the stock ``qubes.VMExec`` is decoded by the agent itself and its command
  executed directly). Then ``STDIN`` frames, an empty one meaning end of input.
* agent → host: ``STDOUT``/``STDERR`` frames, then one ``EXIT`` (a signal ``N`` is
  ``128+N``) once the child exited and closed both streams.

Each call runs in its own session (its process group is the call's, for ``kill -- -PGID``).
The agent itself runs as ``user`` (uid 1000, no capabilities), and so do ``user`` calls; a
``root`` call joins the qube's one nested user namespace mapping uid 0 onto ``user`` (held by a
process the agent forks at start), so ``id`` says root as in a real qube and root's processes
see each other, while every mount and namespace of the sandbox stays owned by the outer
namespace, where root has no capability (it cannot unmount what hides the host's secrets).

When the host hangs up before the exit code, the call's pipes are closed and the command is
left to run, as a real qrexec-agent does: ending a command is the caller's business
(``timeout`` inside the qube, or a kill sent as another call). Processes a call leaves behind
(``nohup server &``) live on until the qube stops.

SIGTERM (the qube's shutdown) sends SIGTERM to every process of the qube, waits up to the
grace period for them to go, then SIGKILLs what is left and exits; the sandbox ends with it.
Everything the agent logs, and every call's stderr, goes to the agent's stderr, which the host
keeps as the qube's console log.

Standard library only: this runs inside the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.vm_files.agent import EXIT_NOT_FOUND, TEMPLATE_RPC_DIR, find_service
from qubes_mcp.sim.vm_files.vmexec import DecodeError, decode_args, resolve_program

#: Users a call may run as: (uid, home). ``DEFAULT`` means ``user`` (the template default).
USERS = {"user": (1000, "/home/user"), "root": (0, "/root")}
#: How long the host may take to send the REQUEST frame.
REQUEST_TIMEOUT = 10.0
CLONE_NEWUSER = 0x10000000
_CHUNK = 65536


def log(message: str) -> None:
    """One line on the console log."""
    stamp = time.strftime("%H:%M:%S")
    with contextlib.suppress(OSError):
        os.write(2, f"[{stamp}] qrexec-agent: {message}\n".encode(errors="replace"))


class CallError(Exception):
    """The request cannot be run; the message goes to the caller's stderr."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_command(untrusted_cmdline: bytes) -> tuple[str, list[str], dict[str, str]]:
    """``USER:COMMAND`` or ``USER:QUBESRPC SERVICE+ARG SOURCE`` → (user, argv, extra env)."""
    try:
        cmdline = untrusted_cmdline.decode("utf-8")
    except UnicodeDecodeError:
        raise CallError("command is not UTF-8", 1) from None
    user, sep, command = cmdline.partition(":")
    if not sep or "\0" in command:
        raise CallError("command must be USER:COMMAND", 1)
    user = "user" if user == "DEFAULT" else user
    if user not in USERS:
        raise CallError(f"user {user!r} does not exist in this qube", 1)
    if not command.startswith("QUBESRPC "):
        return user, ["/bin/sh", "-c", command], {}
    words = command[len("QUBESRPC ") :].split(" ")
    if len(words) != 2 or not words[0] or not words[1]:
        raise CallError("QUBESRPC needs SERVICE+ARG SOURCE", 1)
    service_and_arg, source = words
    path = find_service(service_and_arg)
    if path is None:
        raise CallError(f"service {service_and_arg!r} not found", EXIT_NOT_FOUND)
    service, _, arg = service_and_arg.partition("+")
    argv = [path, arg] if arg else [path]
    if path == f"{TEMPLATE_RPC_DIR}/qubes.VMExec":
        # the stock VMExec is decoded here, not by a Python started per call in the qube (a
        # qube's own /rw/usrlocal override still runs as its program)
        try:
            # a word naming a /usr/lib/qubes helper (qfile-agent, qfile-unpacker: dom0 runs
            # them behind `env … timeout …`) runs the emulated one: the host's read-only /usr
            # has no /usr/lib/qubes (vmexec.resolve_program)
            argv = [os.fsdecode(resolve_program(word)) for word in decode_args(os.fsencode(arg))]
        except DecodeError as exc:
            raise CallError(f"qubes.VMExec: {exc}", 1) from None
    env = {
        "QREXEC_SERVICE_FULL_NAME": f"{service}+{arg}",
        "QREXEC_SERVICE_ARGUMENT": arg,
        "QREXEC_REMOTE_DOMAIN": source,
        "QREXEC_REQUESTED_TARGET_TYPE": "",
        "QREXEC_AGENT_PID": str(os.getpid()),
    }
    return user, argv, env


_libc = ctypes.CDLL(None, use_errno=True)  # resolved before any fork: children only call it


def _write_file(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def start_root_namespace() -> int:
    """Fork the holder of the qube's one ``root`` user namespace; its pid.

    Every root call joins this namespace (``setns``), so root's processes share it as they
    share root in a real qube: one root call can see, ``ptrace`` and kill another's. The
    namespace maps uid 0 onto ``user``; the sandbox's mounts and namespaces stay owned by the
    outer one, where root has no capability.
    """
    base, base_gid = os.getuid(), os.getgid()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: set the namespace up, then wait to die with the sandbox
        try:
            os.close(ready_r)
            if _libc.unshare(CLONE_NEWUSER) != 0:
                os._exit(1)
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"0 {base} 1")
            _write_file("/proc/self/gid_map", f"0 {base_gid} 1")
            os.write(ready_w, b"R")
            os.close(ready_w)
            with contextlib.suppress(BaseException):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    signal.pause()
        finally:
            os._exit(0)
    os.close(ready_w)
    ok = os.read(ready_r, 1) == b"R"
    os.close(ready_r)
    if not ok:
        raise OSError("cannot create the root user namespace")
    return pid


def _become(user: str, root_ns: int) -> Callable[[], None]:
    """What the forked child does before exec: become ``user``, enter the home directory.

    ``user`` is the agent's own identity; ``root`` joins the holder's namespace
    (:func:`start_root_namespace`)."""
    uid, home = USERS[user]

    def child() -> None:
        if uid != os.getuid():
            fd = os.open(f"/proc/{root_ns}/ns/user", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWUSER) != 0:
                    raise OSError(ctypes.get_errno(), "setns(CLONE_NEWUSER)")
            finally:
                os.close(fd)
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        if home != "/home/user":
            os.makedirs(home, mode=0o700, exist_ok=True)
        os.chdir(home)

    return child


class Agent:
    """Accepts calls on the inherited socket and runs each as a child process."""

    def __init__(
        self, listener: socket.socket, base_env: dict[str, str], grace: float, root_ns: int
    ) -> None:
        self.listener = listener
        self.base_env = base_env
        self.grace = grace
        self.root_ns = root_ns
        self.calls = 0

    async def serve(self, stop: asyncio.Event) -> None:
        server = await asyncio.start_unix_server(self._connection, sock=self.listener)
        async with server:
            await stop.wait()

    def _env(self, user: str, extra: dict[str, str]) -> dict[str, str]:
        _uid, home = USERS[user]
        env = {**self.base_env, "HOME": home, "USER": user, "LOGNAME": user, "PWD": home}
        return {**env, **extra}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.calls += 1
        number = self.calls
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), REQUEST_TIMEOUT)
            if frame is None or frame[0] != wire.REQUEST:
                raise wire.WireError("first frame must be REQUEST")
            try:
                user, argv, extra = parse_command(frame[1])
            except CallError as exc:
                writer.write(wire.encode_data(wire.STDERR, f"qrexec-agent: {exc}\n".encode()))
                writer.write(wire.encode_exit(exc.code))
                await writer.drain()
                return
            await self._run(number, (user, argv, self._env(user, extra)), reader, writer)
        except (wire.WireError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            log(f"call {number}: {exc or type(exc).__name__}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _run(
        self,
        number: int,
        what: tuple[str, list[str], dict[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        user, argv, env = what
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=_become(user, self.root_ns),  # noqa: PLW1509 - one thread
            )
        except (OSError, subprocess.SubprocessError) as exc:
            message = f"qrexec-agent: cannot execute {argv[0]}: {exc}\n"
            writer.write(wire.encode_data(wire.STDERR, message.encode()))
            writer.write(wire.encode_exit(EXIT_NOT_FOUND))
            await writer.drain()
            return
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(proc.wait())

        loop.add_reader(pidfd, on_exit)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        connected = True

        async def send(kind: int, data: bytes) -> None:
            nonlocal connected
            if connected:
                try:
                    writer.write(wire.encode_frame(kind, data))
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    connected = False

        async def pump_out(fd: int, kind: int) -> None:
            stream = await _pipe_reader(fd)
            while chunk := await stream.read(_CHUNK):
                if kind == wire.STDERR:
                    with contextlib.suppress(OSError):
                        os.write(2, chunk)  # the console log keeps services' stderr
                await send(kind, chunk)
                if not connected:
                    break

        stdin_fd = proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)

        async def pump_in() -> None:
            try:
                while True:
                    frame = await wire.read_frame(reader)
                    if frame is None or frame[0] != wire.STDIN:
                        return
                    if not frame[1]:
                        return
                    await _write_all(loop, stdin_fd, frame[1])
            except (OSError, wire.WireError, ConnectionError):
                return
            finally:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # type: ignore[union-attr]

        input_task = asyncio.create_task(pump_in())
        outputs = asyncio.gather(
            pump_out(proc.stdout.fileno(), wire.STDOUT),
            pump_out(proc.stderr.fileno(), wire.STDERR),
        )
        await outputs
        code = await exited
        if not input_task.done():
            input_task.cancel()
        with contextlib.suppress(BaseException):
            await input_task
        for stream in (proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if code < 0:
            code = 128 - code
        if connected:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.write(wire.encode_exit(code))
                await writer.drain()
        else:
            log(f"call {number}: caller hung up; {argv[0]} exited {code}")


async def _pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_CHUNK)
    pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


async def _write_all(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


def _others() -> list[int]:
    """Pids of this qube's processes other than its init (1) and this agent."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]


async def shutdown(grace: float) -> None:
    """The qube's shutdown: SIGTERM to all, SIGKILL to what is left after ``grace``."""
    log("shutting down")
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _others() and time.monotonic() < deadline:
        _reap()
        await asyncio.sleep(0.02)
    if _others():
        log("processes left after the grace period: killed")
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def main(argv: Sequence[str]) -> int:
    listen_fd = ready_fd = -1
    grace = 5.0
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "--listen-fd":
            listen_fd = int(value)
        elif key == "--ready-fd":
            ready_fd = int(value)
        elif key == "--grace":
            grace = float(value)
    if listen_fd < 0:
        print("usage: qrexec_agent --listen-fd=N [--ready-fd=N] [--grace=S]", file=sys.stderr)
        return 2
    os.environ.pop("PYTHONPATH", None)
    base_env = dict(os.environ)
    for key in ("HOME", "USER", "LOGNAME", "PWD"):
        base_env.pop(key, None)
    # Like the first boot of a real qube (mount-dirs): /home/user lives on the private
    # volume and exists whoever runs first.
    os.makedirs("/rw/home/user", mode=0o755, exist_ok=True)
    os.chdir("/")
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    agent = Agent(listener, base_env, grace, start_root_namespace())

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        serving = asyncio.create_task(agent.serve(stop))
        await asyncio.sleep(0)
        log(f"started in {os.uname().nodename}")
        if ready_fd >= 0:
            os.write(ready_fd, b"R")
            os.close(ready_fd)
        await stop.wait()
        await shutdown(grace)
        serving.cancel()
        with contextlib.suppress(BaseException):
            await serving

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
