"""The emulated dom0's ``qvm-run``: the subset of options the gate (and a person) uses.

    qvm-run [--pass-io] [--no-gui] [--[no-]filter-escape-chars] [--user USER] [--no-shell]
            [--no-autostart] [--service] [--] VMNAME COMMAND [ARG ...]

Like the real one (qubes-core-admin-client ``qvm_run.py``): a command with arguments, or
``--no-shell``, runs through ``qubes.VMExec+<encoded argv>``; a lone command string runs in a
shell through ``qubes.VMShell``; ``--service`` calls COMMAND as a service. In dom0 none of
this goes through policy: it is dom0's direct line to the qube (``qrexec-client -d``). The
exit code is the command's. GUI and colour options are accepted and ignored (no GUI here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import BinaryIO, cast

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec.client import RouterUnavailableError, call
from qubes_mcp.sim.vm_files.vmexec import encode_args


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qvm-run")
    p.add_argument("--pass-io", "-p", action="store_true")
    for flag in (
        "--no-gui",
        "--nogui",
        "--gui",
        "--filter-escape-chars",
        "--no-filter-escape-chars",
        "--no-colour-output",
        "--no-color-output",
        "--no-colour-stderr",
        "--no-color-stderr",
        "--autostart",
        "--auto",
        "-a",
    ):
        p.add_argument(flag, action="store_true", dest=f"ignored_{flag.strip('-')}")
    p.add_argument("--no-autostart", "--no-auto", "-n", action="store_true")
    p.add_argument("--user", "-u", default="user")
    p.add_argument("--no-shell", action="store_true")
    p.add_argument("--service", action="store_true")
    p.add_argument("vmname")
    p.add_argument("cmd")
    p.add_argument("cmd_args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def service_for(args: argparse.Namespace) -> tuple[str, bytes]:
    """The service to call and the bytes to send before stdin."""
    if args.service:
        return args.cmd, b""
    if args.cmd_args or args.no_shell:
        words = [w.encode() for w in [args.cmd, *args.cmd_args]]
        return f"qubes.VMExec+{encode_args(words)}", b""
    return "qubes.VMShell", args.cmd.encode() + b"; exit\n"


class _Prefixed:
    """``prefix``, then what arrives on file descriptor ``fd`` (read with ``qrexec.client.call``'s
    read1). Raw ``os.read``: the reading thread may still be blocked in it when the call has
    ended, and a buffered reader's lock would then abort the interpreter at exit."""

    def __init__(self, prefix: bytes, fd: int) -> None:
        self._prefix = prefix
        self._fd = fd

    def read1(self, size: int = -1) -> bytes:
        if self._prefix:
            chunk, self._prefix = self._prefix, b""
            return chunk
        return os.read(self._fd, size if size > 0 else 65536)

    read = read1


def install(paths: SimPaths) -> Path:
    """Write ROOT/usr/bin/qvm-run, bound to this emulator root and this Python."""
    script = paths.root / "usr" / "bin" / "qvm-run"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"os.environ['QUBES_SIM_ROOT'] = {str(paths.root)!r}\n"
        "from qubes_mcp.sim.dom0_tools.qvm_run import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    root = os.environ.get("QUBES_SIM_ROOT")
    if not root:
        print(
            "qvm-run: error: QUBES_SIM_ROOT is not set (use ROOT/usr/bin/qvm-run)", file=sys.stderr
        )
        return 1
    paths = SimPaths(Path(root))
    service, prefix = service_for(args)
    # streamed, as the real qvm-run does: a program that answers what it reads (dom0 relaying
    # a copy between two qubes) must get each chunk while the call runs, not at its end
    stdin: bytes | _Prefixed = _Prefixed(prefix, sys.stdin.fileno()) if args.pass_io else prefix

    def out(data: bytes) -> None:
        if args.pass_io:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def err(data: bytes) -> None:
        if args.pass_io:
            sys.stderr.buffer.write(data)
            sys.stderr.buffer.flush()

    try:
        result = asyncio.run(
            call(
                paths,
                source=args.user,
                target=args.vmname,
                service_and_arg=service,
                stdin=stdin if isinstance(stdin, bytes) else cast(BinaryIO, stdin),
                timeout=24 * 3600.0,
                on_stdout=out,
                on_stderr=err,
                socket_path=paths.dom0_direct_sock,
            )
        )
    except RouterUnavailableError as exc:
        print(f"qvm-run: error: {exc}", file=sys.stderr)
        return 1
    # the command's own exit code; a refusal of the line itself already said so on stderr
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
