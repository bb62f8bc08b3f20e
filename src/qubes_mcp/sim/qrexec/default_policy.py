"""The emulator's stock-like qrexec policy (``sim/data/policy.d``), installed into the
emulated dom0 the way the Qubes packages install theirs."""

from __future__ import annotations

import shutil
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths

DEFAULT_POLICY_DIR = Path(__file__).resolve().parent.parent / "data" / "policy.d"


def install_default_policy(paths: SimPaths) -> list[Path]:
    """Copy every stock policy file that is missing into ``ROOT/etc/qubes/policy.d``.

    Files that exist are left alone (the operator may have edited them); the operator's own
    rules belong in an earlier file such as ``30-user.policy``. Returns the files written.
    """
    dest_root = paths.policy_dirs[-1]
    written: list[Path] = []
    for src in sorted(DEFAULT_POLICY_DIR.rglob("*")):
        if not src.is_file():
            continue
        dest = dest_root / src.relative_to(DEFAULT_POLICY_DIR)
        if dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    return written
