"""``qubes.ConnectTCP`` and ``qvm-connect-tcp`` inside an emulated qube (lab links).

R4.3 (qubes-core-agent-linux): the service ``/etc/qubes-rpc/qubes.ConnectTCP`` is a symlink
to ``/dev/tcp/127.0.0.1``, so qrexec itself connects the call to ``127.0.0.1:ARG`` in the
called qube (and refuses an argument that is not a port); ``qvm-connect-tcp
[LOCALPORT]:[VMNAME]:PORT`` in the calling qube starts, in the background, ``socat
TCP-LISTEN:LOCALPORT,reuseaddr,fork EXEC:"qrexec-client-vm VMNAME qubes.ConnectTCP+PORT"`` and
returns. Here both are small Python programs (no socat in the sandbox):

* :func:`service_main` connects to ``127.0.0.1:PORT`` and relays bytes both ways until the
  TCP peer closes (``exit-on-service-eof``, as the service's R4.3 config says);
* :func:`connect_main` binds the listening port first (so a port in use is an error here,
  where socat's background failure goes unnoticed -- docs/fidelity.md), then detaches and, for
  each connection, forks ``qrexec-client-vm VMNAME qubes.ConnectTCP+PORT`` with the
  connection as its stdin and stdout.

Standard library only: this runs inside the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

CLIENT_VM = "qrexec-client-vm"
USAGE = "Usage: qvm-connect-tcp [localport]:[vmname]:[port]"


def _port(text: str) -> int | None:
    return int(text) if text.isdigit() and 1 <= int(text) <= 65535 else None


def service_main(argv: Sequence[str]) -> int:
    """``qubes.ConnectTCP+PORT``: stdin/stdout ↔ ``127.0.0.1:PORT``."""
    port = _port(argv[0]) if argv else None
    if port is None:
        print("qubes.ConnectTCP: the argument must be a port 1..65535", file=sys.stderr)
        return 1
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        print(f"qubes.ConnectTCP: 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)

    def upstream() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(0, 65536):
                sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    with contextlib.suppress(OSError):
        while data := sock.recv(65536):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]
    sock.close()
    return 0


def _parse(spec: str) -> tuple[int, str, int] | None:
    parts = spec.split(":")
    if len(parts) != 3:
        return None
    port = _port(parts[2])
    local = _port(parts[0]) if parts[0] else port
    if port is None or local is None:
        return None
    return local, parts[1] or "@default", port


def _serve(listener: socket.socket, domain: str, port: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        except OSError:
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            listener.close()
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            conn.close()
            try:
                os.execvp(CLIENT_VM, [CLIENT_VM, domain, f"qubes.ConnectTCP+{port}"])  # noqa: S606
            finally:
                os._exit(127)
        conn.close()


def connect_main(argv: Sequence[str]) -> int:
    """``qvm-connect-tcp [LOCALPORT]:[VMNAME]:PORT``: bind, detach, serve; exit 0 at once."""
    parsed = _parse(argv[0]) if len(argv) == 1 else None
    if parsed is None:
        print(f"Invalid port provided\n{USAGE}", file=sys.stderr)
        return 1
    local, domain, port = parsed
    print(f"Binding TCP '{domain}:{port}' to 'localhost:{local}'...")
    sys.stdout.flush()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", local))  # socat TCP-LISTEN binds every address, as here
        listener.listen(16)
    except OSError as exc:
        print(f"qvm-connect-tcp: port {local}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if os.fork() != 0:
        return 0  # the listener runs on in the background, like socat … &
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    _serve(listener, domain, port)
    return 0
