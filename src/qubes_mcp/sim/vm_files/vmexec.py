"""``qubes.VMExec+ARG``: run a command whose argv is encoded in the service argument.

Encoding (CAC ``qubesadmin/utils.py`` ``encode_for_vmexec``): words joined by ``+``; in each
word, bytes outside ``[A-Za-z0-9_.]`` are written ``-XX`` (two upper-case hex digits) and ``-``
itself as ``--``. Decoding is strict: anything else is refused before anything runs.

An emulated qube shares the host's read-only ``/usr``, so the template's ``/usr/lib/qubes``
helpers (``qfile-agent``, ``qfile-unpacker``) cannot be placed there: a command naming one of
them by its real path runs the emulated program shipped in ``vm_files/bin`` instead
(:func:`resolve_program`). Every other path is executed as given.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

_PLAIN = re.compile(rb"[A-Za-z0-9_.]")
#: where a real template keeps its qrexec helpers, and where the emulated ones are
QUBES_LIBEXEC = b"/usr/lib/qubes/"
EMULATED_LIBEXEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin")
LIBEXEC_PROGRAMS = frozenset({b"qfile-agent", b"qfile-unpacker"})
_HEX = b"0123456789ABCDEF"


class DecodeError(ValueError):
    """The argument is not a valid VMExec encoding."""


def decode_word(untrusted_word: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(untrusted_word):
        c = untrusted_word[i : i + 1]
        if c != b"-":
            if not _PLAIN.match(c):
                raise DecodeError(f"invalid character {c!r}")
            out += c
            i += 1
            continue
        nxt = untrusted_word[i + 1 : i + 2]
        if nxt == b"-":
            out += b"-"
            i += 2
            continue
        pair = untrusted_word[i + 1 : i + 3]
        if len(pair) != 2 or any(b not in _HEX for b in pair):
            raise DecodeError("invalid escape sequence")
        out.append(int(pair, 16))
        i += 3
    return bytes(out)


def decode_args(untrusted_arg: bytes) -> list[bytes]:
    """argv from a VMExec argument; refuses empty commands and NUL bytes."""
    words = [decode_word(w) for w in untrusted_arg.split(b"+")]
    if not words or not words[0]:
        raise DecodeError("empty command")
    if any(b"\0" in w for w in words):
        raise DecodeError("NUL byte in argument")
    return words


def encode_args(args: Sequence[bytes]) -> str:
    """The inverse, for callers and tests."""
    words = []
    for arg in args:
        word = "".join(
            chr(b) if _PLAIN.match(bytes([b])) else "--" if b == 0x2D else f"-{b:02X}" for b in arg
        )
        words.append(word)
    return "+".join(words)


def resolve_program(program: bytes) -> bytes:
    """The file to execute for ``program``: an emulated ``/usr/lib/qubes`` helper, or itself."""
    if program.startswith(QUBES_LIBEXEC) and program[len(QUBES_LIBEXEC) :] in LIBEXEC_PROGRAMS:
        return os.path.join(os.fsencode(EMULATED_LIBEXEC), program[len(QUBES_LIBEXEC) :])
    return program


def main(argv: Sequence[str]) -> int:
    untrusted_arg = os.fsencode(argv[0]) if argv else b""
    try:
        args = decode_args(untrusted_arg)
    except DecodeError as exc:
        print(f"qubes.VMExec: {exc}", file=sys.stderr)
        return 1
    try:
        os.execvp(resolve_program(args[0]), args)  # noqa: S606 - exec is the service
    except OSError as exc:
        print(f"qubes.VMExec: {os.fsdecode(args[0])}: {exc.strerror}", file=sys.stderr)
    return 127
