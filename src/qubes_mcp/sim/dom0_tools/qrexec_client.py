"""The emulated dom0's ``qrexec-client``: dom0's direct line into a running qube's agent.

    qrexec-client [-t] [-T] [-w TIMEOUT] -d DOMAIN USER:COMMAND

As on a real dom0 (``/usr/lib/qubes/qrexec-client``, QX ``daemon/qrexec-client.c``): no
policy is evaluated (dom0 may run anything in any qube), the qube must already run (it is not
started; ``qvm-run`` starts it first through qubesd), and ``USER:COMMAND`` is what the agent
runs: ``USER:QUBESRPC SERVICE+ARG SOURCE`` calls a service, anything else runs in a shell.
``DEFAULT`` as USER is the qube's default user. stdin is relayed to the command, its stdout and
stderr back, and the exit status is the command's. ``-t``/``-T`` (replace escape characters
in stdout/stderr) are accepted and ignored (the emulator has no terminal to protect here).

Here the line is ``ROOT/run/qubes/qrexec.DOMAIN``, whose listening end the qube's agent holds
(:mod:`qubes_mcp.sim.machine`). Like the real one, hanging up does not stop the command in the
qube: a caller that needs it ended wraps it (``timeout``) or kills it with another call.

Where the host has a C compiler, ``sim run`` installs ``qrexec_client.c`` compiled instead
(about 1 ms per command); this Python twin is the fallback and the reference. It runs once per
command, so it imports only what it needs (no asyncio): a fresh interpreter costs ~10 ms.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from qubes_mcp.sim.qrexec import wire

TYPE_CHECKING = False  # not typing's: see the module docstring
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from qubes_mcp.sim.paths import SimPaths

USAGE = "usage: qrexec-client [-t] [-T] [-w TIMEOUT] -d DOMAIN USER:COMMAND"
#: Exit status when the qube's agent cannot be reached (not running) or breaks the protocol.
EXIT_NO_AGENT = 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pump_stdin(sock: socket.socket) -> None:
    try:
        while chunk := os.read(0, wire.MAX_DATA_LEN):
            sock.sendall(wire.encode_frame(wire.STDIN, chunk))
        sock.sendall(wire.encode_frame(wire.STDIN, b""))
    except OSError:
        pass  # the call ended first


def run(socket_path: str, command: str) -> int:
    """Run ``command`` through the agent at ``socket_path``; the command's exit status."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        sock.sendall(wire.encode_frame(wire.REQUEST, command.encode()))
    except OSError as exc:
        sock.close()
        print(f"qrexec-client: cannot connect to the qube's agent: {exc.strerror}", file=sys.stderr)
        return EXIT_NO_AGENT
    with sock:
        threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
        try:
            while True:
                frame = wire.read_frame_sync(sock)
                if frame is None:
                    return EXIT_NO_AGENT
                kind, data = frame
                if kind == wire.STDOUT:
                    _write_all(1, data)
                elif kind == wire.STDERR:
                    _write_all(2, data)
                elif kind == wire.EXIT:
                    return wire.decode_exit(data)
                else:
                    raise wire.WireError(f"unexpected frame {kind:#x}")
        except (OSError, wire.WireError) as exc:
            print(f"qrexec-client: the call broke: {exc}", file=sys.stderr)
            return EXIT_NO_AGENT


def main(argv: Sequence[str] | None = None, root: str | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    domain = None
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-t", "-T"):
            continue
        if opt == "-d" and args:
            domain = args.pop(0)
        elif opt == "-w" and args:
            args.pop(0)
        else:
            print(USAGE, file=sys.stderr)
            return 2
    root = root or os.environ.get("QUBES_SIM_ROOT")
    if domain is None or len(args) != 1 or not root:
        print(USAGE, file=sys.stderr)
        return 2
    if "/" in domain or domain in ("", ".", ".."):
        print(f"qrexec-client: invalid domain {domain!r}", file=sys.stderr)
        return 2
    return run(f"{root}/run/qubes/qrexec.{domain}", args[0])


def install(paths: SimPaths) -> Path:
    """Write ``ROOT/usr/lib/qubes/qrexec-client``.

    Where the host has a C compiler, it is ``qrexec_client.c`` compiled (a real dom0's is a C
    program too, and a per-command helper should not pay for an interpreter); the build is
    kept and redone only when the source changes. Otherwise it is this module as a script,
    started isolated and without ``site`` (``-IS``) with only this package on its path.
    """
    import hashlib
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root = paths.root
    script = root / "usr" / "lib" / "qubes" / "qrexec-client"
    script.parent.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).with_suffix(".c")
    stamp = script.with_name(".qrexec-client.source-sha256")
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else ""
    if digest and stamp.exists() and stamp.read_text() == digest and script.exists():
        return script
    compiler = shutil.which("cc") or shutil.which("gcc")
    if digest and compiler is not None and os.environ.get("QUBES_SIM_NO_CC") != "1":
        built = script.with_name(".qrexec-client.build")
        done = subprocess.run(
            [compiler, "-O2", "-Wall", "-o", str(built), str(source)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode == 0:
            os.replace(built, script)
            stamp.write_text(digest)
            return script
        built.unlink(missing_ok=True)
    stamp.unlink(missing_ok=True)
    package_parent = str(Path(__file__).resolve().parents[3])
    script.unlink(missing_ok=True)
    script.write_text(
        f"#!{sys.executable} -IS\n"
        "import sys\n"
        f"sys.path.insert(0, {package_parent!r})\n"
        "from qubes_mcp.sim.dom0_tools.qrexec_client import main\n"
        f"sys.exit(main(root={str(root)!r}))\n"
    )
    script.chmod(0o755)
    return script


if __name__ == "__main__":
    sys.exit(main())
