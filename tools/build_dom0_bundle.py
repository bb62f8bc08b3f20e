"""Build the dom0 bundle: the gate and the policy engine, standard library only.

    python3 tools/build_dom0_bundle.py [--out DIR]

Writes ``qubes-mcp-dom0-<version>.tar.gz`` (reproducible: sorted entries, fixed owner and
mtime) containing ``qubes_mcp/__init__.py``, ``qubes_mcp/dom0/``, ``qubes_mcp/policy/`` and
``bin/qubes-mcp-admin``, and prints its SHA-256. Run it in an agent-free qube and compare the
hash in dom0 (docs/operator-guide.md, section 2).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
LAUNCHER = b"""#!/usr/bin/python3 -I
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
from qubes_mcp.dom0.operator.cli import main
sys.exit(main())
"""


def bundle_files() -> list[tuple[str, bytes, int]]:
    files = [("qubes_mcp/__init__.py", (SRC / "qubes_mcp/__init__.py").read_bytes(), 0o644)]
    for part in ("dom0", "policy"):
        for path in sorted((SRC / "qubes_mcp" / part).rglob("*.py")):
            files.append((str(path.relative_to(SRC)), path.read_bytes(), 0o644))
    files.append(("bin/qubes-mcp-admin", LAUNCHER, 0o755))
    return files


def build(out_dir: Path) -> Path:
    version = {}
    exec((SRC / "qubes_mcp/__init__.py").read_text(), version)  # noqa: S102 - our own file
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in bundle_files():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    out = out_dir / f"qubes-mcp-dom0-{version['__version__']}.tar.gz"
    out_dir.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dist", help="output directory (default: dist)")
    args = parser.parse_args()
    out = build(Path(args.out))
    print(f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
