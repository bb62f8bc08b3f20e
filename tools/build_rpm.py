"""Build the dom0 RPM: ``python3 tools/build_rpm.py [--out DIR]`` (``make rpm``).

The RPM carries exactly the dom0 bundle (``tools/build_dom0_bundle.py``: the standard-library
``qubes_mcp.dom0`` and ``qubes_mcp.policy``) under ``/usr/lib/qubes-mcp``, the
``qubes-mcp-admin`` launcher in ``/usr/bin``, the systemd unit ``install`` would write, a
configuration example and the licence. The spec is ``packaging/rpm/qubes-mcp-dom0.spec``;
``rpmbuild`` comes with Debian's ``rpm`` package too, so any build qube can make it.
Prints the RPM's SHA-256 and path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
SPEC = TOP / "packaging" / "rpm" / "qubes-mcp-dom0.spec"
sys.path.insert(0, str(TOP / "src"))

from qubes_mcp import __version__  # noqa: E402 - after the path is set
from qubes_mcp.dom0.operator.install import UNIT_TEXT, Layout, default_config_text  # noqa: E402


def _bundle_builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_dom0_bundle", TOP / "tools" / "build_dom0_bundle.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(out_dir: Path) -> Path:
    """Build the RPM into ``out_dir``; raises ``subprocess.CalledProcessError`` on failure."""
    rpmbuild = shutil.which("rpmbuild")
    if rpmbuild is None:
        raise FileNotFoundError(
            "rpmbuild not found: install the 'rpm' package (apt-get install rpm)"
        )
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-rpm-") as tmp:
        top = Path(tmp)
        sources = top / "SOURCES"
        sources.mkdir()
        _bundle_builder().build(sources)
        (sources / "qubes-mcp-gate.service").write_text(
            UNIT_TEXT.format(exe="/usr/bin/qubes-mcp-admin", config="/etc/qubes-mcp/config.toml")
        )
        (sources / "config.toml.example").write_text(
            default_config_text(Layout(Path("/")), "mcp-control", "ai-egress")
        )
        shutil.copy(TOP / "LICENSE", sources / "LICENSE")
        subprocess.run(
            [
                rpmbuild,
                "-bb",
                "--quiet",
                "--define",
                f"_topdir {top}",
                "--define",
                f"version {__version__}",
                "--define",
                "_source_date_epoch_from_changelog 0",
                "--define",
                "use_source_date_epoch_as_buildtime 1",
                "--define",
                "clamp_mtime_to_source_date_epoch 1",
                str(SPEC),
            ],
            check=True,
            env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": "0", "LC_ALL": "C"},
        )
        built = next((top / "RPMS" / "noarch").glob("*.rpm"))
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / built.name
        shutil.copy(built, target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dist", help="output directory (default: dist)")
    args = parser.parse_args()
    out = build(Path(args.out))
    print(f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
