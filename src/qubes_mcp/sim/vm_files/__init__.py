"""What an emulated qube sees of Qubes: the qrexec agent, the shims on its ``PATH``
(``bin/qrexec-client-vm``, ``bin/qvm-copy-to-vm``, ``bin/qvm-copy``) and the qube-side
services (``rpc/qubes.VMShell``, ``rpc/qubes.VMExec``, ``rpc/qubes.Filecopy``).

The whole ``qubes_mcp`` package is bound read-only into each sandbox; the modules here (and
``qubes_mcp.sim.qrexec.wire``) import only the standard library so they run there.
"""

from __future__ import annotations

from pathlib import Path

VM_FILES_DIR = Path(__file__).resolve().parent
