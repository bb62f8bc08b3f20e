"""The ``qubes.Filecopy`` service body: ``exec qfile-unpacker`` (with ``--allow-all-names``
for ``qubes.Filecopy+allow-all-names``), so files from ``QREXEC_REMOTE_DOMAIN`` land in
``~/QubesIncoming/<source>/``, as the real ``/etc/qubes-rpc/qubes.Filecopy`` does."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from qubes_mcp.sim.vm_files import qfile_unpacker


def main(argv: Sequence[str] = ()) -> int:
    arg = argv[0] if argv else ""
    if arg not in ("", "allow-all-names"):
        print(f"Unexpected argument {arg}", file=sys.stderr)
        return 1
    return qfile_unpacker.main(["--allow-all-names"] if arg else [])
