"""``qubes.VMExec+ARG``: run a command whose argv is encoded in the service argument.

Encoding (CAC ``qubesadmin/utils.py`` ``encode_for_vmexec``): words joined by ``+``; in each
word, bytes outside ``[A-Za-z0-9_.]`` are written ``-XX`` (two upper-case hex digits) and ``-``
itself as ``--``. Decoding is strict: anything else is refused before anything runs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

_PLAIN = re.compile(rb"[A-Za-z0-9_.]")
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


def main(argv: Sequence[str]) -> int:
    untrusted_arg = os.fsencode(argv[0]) if argv else b""
    try:
        args = decode_args(untrusted_arg)
    except DecodeError as exc:
        print(f"qubes.VMExec: {exc}", file=sys.stderr)
        return 1
    try:
        os.execvp(args[0], args)  # noqa: S606 - exec is the service
    except OSError as exc:
        print(f"qubes.VMExec: {os.fsdecode(args[0])}: {exc.strerror}", file=sys.stderr)
    return 127
