"""``/usr/lib/qubes/qfile-unpacker [-v] [--allow-…] [UID [DIR]]``: the receiving half of a copy.

Modes of the real program (qubes-core-agent-linux ``qfile-unpacker.c``): with no DIR the files
land in ``<home of UID>/QubesIncoming/$QREXEC_REMOTE_DOMAIN/`` (created, mode 0700) — what the
``qubes.Filecopy`` service does; with DIR (which must exist) they land in DIR — what dom0 uses
when it relays a copy, naming the source itself so the sender has no say. UID defaults to the
caller's; only root may name another. The stream is read from stdin, the answer written to
stdout, the exit code is the error code (low byte). The real program also bind-mounts DIR
``nodev,noexec,nosuid`` and chroots into it; an emulated qube has no such privilege, so the
receiver here opens every component with ``O_NOFOLLOW`` instead (see ``qfile.Unpacker``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import sys
from collections.abc import Sequence

from qubes_mcp.sim.vm_files.qfile import DEFAULT_FLAGS, Unpacker

INCOMING_DIR_NAME = "QubesIncoming"
_QUBE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")
_UID = re.compile(r"\A(0|[1-9][0-9]{0,9})\Z")
_OPTIONS = {
    "-v",
    "--verbose",
    "--allow-all-names",
    "--allow-unsafe-characters",
    "--no-allow-unsafe-characters",
    "--allow-unsafe-symlinks",
    "--no-allow-unsafe-symlinks",
}
#: Hard caps on one transfer (the real program is bounded by the disk; dom0 caps its relays).
BYTES_LIMIT = 4 * 1024**3
FILES_LIMIT = 100_000


def _fatal(message: str) -> int:
    print(f"qfile-unpacker: {message}", file=sys.stderr)
    return 1


def _parse(argv: Sequence[str]) -> tuple[list[str], str | None]:
    words = list(argv)
    if len(words) >= 2 and words[0][:1].isdigit():  # legacy: UID DIR [-v] [-w [N]]
        return words[:2], None
    positional: list[str] = []
    for index, word in enumerate(words):
        if word == "--":
            positional += words[index + 1 :]
            break
        if word.startswith("-") and not positional:
            if word not in _OPTIONS:
                return [], f"unrecognized option '{word}'"
            continue
        positional.append(word)
    if len(positional) > 2:
        return (
            [],
            "Wrong number of non-option arguments "
            f"(expected no more than 2, got {len(positional)})",
        )
    return positional, None


def main(argv: Sequence[str]) -> int:
    positional, problem = _parse(argv)
    if problem:
        return _fatal(problem)
    caller = os.getuid()
    uid = caller
    if positional and positional[0]:
        if not _UID.match(positional[0]):
            return _fatal("Invalid user ID argument")
        uid = int(positional[0])
    if caller not in (0, uid):
        return _fatal("Refusing to change to UID other than the caller's UID")
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        return _fatal("getpwuid: no such user")
    if len(positional) == 2:
        incoming = positional[1]
    else:
        source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
        if not _QUBE_NAME.match(source):
            return _fatal("Cannot get remote domain name")
        root = os.path.join(home, INCOMING_DIR_NAME)
        incoming = os.path.join(root, source)
        for directory in (root, incoming):
            with contextlib.suppress(OSError):  # harmless, as in the real program:
                os.mkdir(directory, 0o700)  # the chdir below decides
    try:
        os.chdir(incoming)
    except OSError:
        return _fatal(f"Error chdir to {incoming}")
    code = Unpacker(DEFAULT_FLAGS, bytes_limit=BYTES_LIMIT, files_limit=FILES_LIMIT).unpack(
        sys.stdin.buffer, sys.stdout.buffer
    )
    return code & 0xFF
