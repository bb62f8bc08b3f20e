"""``qrexec-client-vm TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS…]]`` inside an emulated qube.

It speaks :mod:`qubes_mcp.sim.qrexec.wire` over the qube's agent socket, bound at a fixed
path. The router knows the caller by that socket, so nothing here can claim another source.
Exit codes (QX ``agent/qrexec-client-vm.rst``): the remote service's code, or the local
program's when one is given; 126 with ``Request refused`` on stderr when policy denies; 1 when
the agent cannot be reached.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from qubes_mcp.sim.qrexec import wire

AGENT_SOCKET = "/run/qubes-sim/router/agent.sock"
MAX_TARGET_LEN = 63
_IGNORED_FLAGS = {
    "-t",
    "-T",
    "--no-filter-escape-chars-stdout",
    "--no-filter-escape-chars-stderr",
    "--filter-escape-chars-stdout",
    "--filter-escape-chars-stderr",
}
USAGE = "usage: qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARGS...]]"


class CallRefusedError(Exception):
    """Policy refused the call."""


def normalise_target(target: str) -> str:
    """``$`` keywords are the old spelling of ``@`` ones; the target field holds 63 bytes."""
    return target.replace("$", "@").encode()[:MAX_TARGET_LEN].decode(errors="ignore")


def open_call(target: str, service_and_arg: str, agent_socket: str = AGENT_SOCKET) -> socket.socket:
    """Connect, send the request and wait for the router's verdict.

    Raises:
        CallRefusedError: policy denied (or the target could not be started).
        OSError: the agent socket is unreachable.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(agent_socket)
        sock.sendall(wire.encode_request(normalise_target(target), service_and_arg))
        frame = wire.read_frame_sync(sock)
    except BaseException:
        sock.close()
        raise
    if frame is None or frame[0] != wire.ACCEPTED:
        sock.close()
        raise CallRefusedError()
    return sock


def _pump_to_remote(sock: socket.socket, read: Callable[[], bytes]) -> None:
    """Send everything ``read`` yields as STDIN frames, then the end-of-input frame."""
    try:
        while chunk := read():
            sock.sendall(wire.encode_data(wire.STDIN, chunk))
        sock.sendall(wire.encode_frame(wire.STDIN, b""))
    except OSError:
        pass  # the call ended first; the remote side no longer wants input


def relay(
    sock: socket.socket, on_stdout: Callable[[bytes], None], on_stderr: Callable[[bytes], None]
) -> int:
    """Deliver output frames until the remote exit code arrives."""
    while True:
        frame = wire.read_frame_sync(sock)
        if frame is None:
            return 1
        kind, data = frame
        if kind == wire.STDOUT:
            on_stdout(data)
        elif kind == wire.STDERR:
            on_stderr(data)
        elif kind == wire.EXIT:
            return wire.decode_exit(data)
        else:
            raise wire.WireError(f"unexpected frame {kind:#x} from the router")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    agent_socket = AGENT_SOCKET
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt == "--":
            break
        if opt.startswith("--agent-socket="):
            agent_socket = opt.split("=", 1)[1]
        elif opt in _IGNORED_FLAGS or opt.startswith("--buffer-size="):
            continue
        else:
            print(f"qrexec-client-vm: unsupported option {opt}\n{USAGE}", file=sys.stderr)
            return 2
    if len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    target, service_and_arg, local = args[0], args[1], args[2:]
    try:
        sock = open_call(target, service_and_arg, agent_socket)
    except CallRefusedError:
        sys.stderr.write(wire.REFUSED_MESSAGE.decode())
        return wire.EXIT_REFUSED
    except (OSError, wire.WireError) as exc:
        print(f"qrexec-client-vm: cannot reach the qrexec agent: {exc}", file=sys.stderr)
        return 1
    with sock:
        if not local:
            threading.Thread(
                target=_pump_to_remote, args=(sock, lambda: os.read(0, 65536)), daemon=True
            ).start()
            return relay(sock, lambda d: _write_all(1, d), lambda d: _write_all(2, d))
        try:
            proc = subprocess.Popen(local, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as exc:
            print(f"qrexec-client-vm: {local[0]}: {exc.strerror}", file=sys.stderr)
            return wire.EXIT_LOCAL_PROBLEM
        assert proc.stdin is not None and proc.stdout is not None
        out_fd = proc.stdout.fileno()
        threading.Thread(
            target=_pump_to_remote, args=(sock, lambda: os.read(out_fd, 65536)), daemon=True
        ).start()
        to_local = proc.stdin

        def feed_local(data: bytes) -> None:
            try:
                to_local.write(data)
                to_local.flush()
            except OSError:
                pass

        try:
            relay(sock, feed_local, lambda d: _write_all(2, d))
        finally:
            with contextlib.suppress(OSError):
                to_local.close()
        return proc.wait()
