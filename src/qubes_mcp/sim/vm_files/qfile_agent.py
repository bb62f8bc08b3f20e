"""``/usr/lib/qubes/qfile-agent [--ignore-symlinks] [--] FILE…``: the sending half of a copy.

What ``qvm-copy`` runs at the local end of ``qrexec-client-vm … qubes.Filecopy`` (and what dom0
runs in the source qube when it relays a copy itself): the qfile stream goes to stdout, the
receiver's answer is read from stdin. Like the real one (qubes-core-agent-linux
``qfile-agent.c``), each FILE is sent from its parent directory under its base name, a missing
or unreadable FILE ends the transfer with a message and exit code 1 (what was sent before stays
sent; the receiver sees a stream without its end marker), and a receiver error is reported with
``pack.c``'s wording.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from qubes_mcp.sim.vm_files.qfile import Packer, parse_result, result_error

_RESULT_MAX = 16 + 4 + 16384


def _write_out(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)


def _read_result() -> bytes:
    sys.stdout.buffer.flush()
    stdin = sys.stdin.buffer
    read = getattr(stdin, "read1", stdin.read)
    data = bytearray()
    while len(data) < _RESULT_MAX and (chunk := read(_RESULT_MAX - len(data))):
        data += chunk
    return bytes(data)


def main(argv: Sequence[str]) -> int:
    files: list[str] = []
    options_done = False
    for arg in argv:
        if not options_done and arg == "--ignore-symlinks":
            continue  # accepted; emulated qubes send links as links either way
        if not options_done and arg == "--":
            options_done = True
            continue
        if not arg:
            print(f"qfile-agent: Invalid empty argument {len(files) + 1}", file=sys.stderr)
            return 1
        files.append(arg)
    packer = Packer(_write_out)
    cwd = os.getcwd()
    try:
        for name in files:
            path = os.path.abspath(name.rstrip("/") or "/")
            try:
                os.chdir(os.path.dirname(path))
                packer.walk(os.fsencode(os.path.basename(path)))
            except OSError as exc:
                print(f"qfile-agent: stat {name}: {exc.strerror}", file=sys.stderr)
                return 1
            finally:
                os.chdir(cwd)
        packer.end()
        message = result_error(parse_result(_read_result()), packer.crc)
    except BrokenPipeError:  # the receiver stopped reading: its answer says why
        message = result_error(parse_result(_read_result()), packer.crc) or "qfile-agent: EPIPE"
    if message:
        print(message, file=sys.stderr)
        return 1
    return 0
