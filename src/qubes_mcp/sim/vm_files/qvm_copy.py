"""``qvm-copy-to-vm TARGET FILE…`` and ``qvm-copy FILE…`` (target ``@default``: the policy
asks) inside an emulated qube: a qfile sender over ``qubes.Filecopy``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.vm_files.client_vm import CallRefusedError, open_call, relay
from qubes_mcp.sim.vm_files.qfile import Packer, parse_result, result_error


def _to_stderr(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


def copy_files(target: str, files: Sequence[str], prog: str) -> int:
    for name in files:
        if not os.path.lexists(name):
            print(f"{prog}: {name}: No such file or directory", file=sys.stderr)
            return 1
    try:
        sock = open_call(target, "qubes.Filecopy")
    except CallRefusedError:
        sys.stderr.write(wire.REFUSED_MESSAGE.decode())
        return wire.EXIT_REFUSED
    except (OSError, wire.WireError) as exc:
        print(f"{prog}: cannot reach the qrexec agent: {exc}", file=sys.stderr)
        return 1
    answer = bytearray()
    with sock:
        packer = Packer(lambda data: sock.sendall(wire.encode_data(wire.STDIN, data)))
        cwd = os.getcwd()
        try:
            for name in files:
                path = os.path.abspath(name.rstrip("/") or "/")
                os.chdir(os.path.dirname(path))
                packer.walk(os.fsencode(os.path.basename(path)))
                os.chdir(cwd)
            packer.end()
            sock.sendall(wire.encode_frame(wire.STDIN, b""))
        except OSError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)  # result below may say more
        finally:
            os.chdir(cwd)
        relay(sock, answer.extend, _to_stderr)
    message = result_error(parse_result(bytes(answer)), packer.crc)
    if message:
        print(message, file=sys.stderr)
        return 1
    return 0


def _files(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != "--without-progress"]


def main_copy_to_vm(argv: Sequence[str]) -> int:
    args = _files(argv)
    if len(args) < 2:
        print("usage: qvm-copy-to-vm [--without-progress] TARGET FILE [FILE...]", file=sys.stderr)
        return 2
    return copy_files(args[0], args[1:], "qvm-copy-to-vm")


def main_copy(argv: Sequence[str]) -> int:
    args = _files(argv)
    if not args:
        print("usage: qvm-copy [--without-progress] FILE [FILE...]", file=sys.stderr)
        return 2
    return copy_files("@default", args, "qvm-copy")
