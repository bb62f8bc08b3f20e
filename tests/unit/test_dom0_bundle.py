"""The dom0 bundle is reproducible, holds only the trusted core, and runs on bare Python."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "build_dom0_bundle.py"
spec = importlib.util.spec_from_file_location("build_dom0_bundle", TOOLS)
assert spec is not None and spec.loader is not None
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)


def test_bundle_is_reproducible_and_holds_only_the_trusted_core(tmp_path: Path) -> None:
    first = bundle.build(tmp_path / "a")
    second = bundle.build(tmp_path / "b")
    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    )
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert "bin/qubes-mcp-admin" in names
    for name in names:
        assert (
            name.startswith(("qubes_mcp/dom0/", "qubes_mcp/policy/", "bin/"))
            or name == "qubes_mcp/__init__.py"
        ), name


def test_bundle_runs_with_nothing_but_the_standard_library(tmp_path: Path) -> None:
    out = bundle.build(tmp_path)
    dest = tmp_path / "dom0"
    with tarfile.open(out) as tar:
        tar.extractall(dest, filter="data")
    policy = tmp_path / "policy.d"
    policy.mkdir()
    (policy / "30-x.policy").write_text("qubes.Filecopy * @anyvm @anyvm deny\n")
    # -I: isolated mode, no site-packages, no cwd on sys.path — like a bare dom0 python
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(dest / "bin/qubes-mcp-admin"),
            "policy",
            "lint",
            "--dir",
            str(policy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 rules in 1 files")
