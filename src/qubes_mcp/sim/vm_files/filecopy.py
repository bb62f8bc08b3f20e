"""``qubes.Filecopy`` receiver: files from ``QREXEC_REMOTE_DOMAIN`` land in
``~/QubesIncoming/<source>/`` (what ``qfile-unpacker`` does in a real qube)."""

from __future__ import annotations

import os
import re
import sys

from qubes_mcp.sim.vm_files.qfile import DEFAULT_FLAGS, Unpacker

_QUBE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")
#: Hard caps on one transfer (real qfile-unpacker takes them from its options).
BYTES_LIMIT = 4 * 1024**3
FILES_LIMIT = 100_000


def main() -> int:
    source = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not _QUBE_NAME.match(source):
        print("qubes.Filecopy: invalid source qube name", file=sys.stderr)
        return 1
    incoming = os.path.join(os.path.expanduser("~"), "QubesIncoming", source)
    os.makedirs(incoming, mode=0o700, exist_ok=True)
    os.chdir(incoming)
    code = Unpacker(DEFAULT_FLAGS, bytes_limit=BYTES_LIMIT, files_limit=FILES_LIMIT).unpack(
        sys.stdin.buffer, sys.stdout.buffer
    )
    return code & 0xFF
