"""The dom0 RPM: what it holds, what it needs, what its scriptlets do (issue 9 §3).

CI installs ``rpm`` (tools/ensure-tools.sh) and builds the package here; elsewhere the test is
skipped with a reason when ``rpmbuild`` is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from qubes_mcp import __version__
from qubes_mcp.dom0.operator.install import UNIT_TEXT

TOP = Path(__file__).resolve().parents[2]
SRC = TOP / "src"

pytestmark = pytest.mark.skipif(
    shutil.which("rpmbuild") is None and not os.environ.get("CI"),
    reason="rpmbuild is missing (apt-get install rpm); CI installs it and runs this test",
)


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("build_rpm", TOP / "tools" / "build_rpm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: Path = module.build(tmp_path_factory.mktemp("rpm"))
    return built


def _query(rpm: Path, *args: str) -> str:
    return subprocess.run(
        ["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True
    ).stdout


def test_it_holds_exactly_the_trusted_core_the_launcher_the_unit_and_the_docs(rpm: Path) -> None:
    files = set(_query(rpm, "-l").split())
    core = {
        f"/usr/lib/qubes-mcp/{p.relative_to(SRC)}"
        for part in ("dom0", "policy")
        for p in (SRC / "qubes_mcp" / part).rglob("*.py")
    }
    dirs = {
        "/usr/lib/qubes-mcp",
        "/usr/lib/qubes-mcp/bin",
        "/usr/lib/qubes-mcp/qubes_mcp",
        "/usr/lib/qubes-mcp/qubes_mcp/dom0",
        "/usr/lib/qubes-mcp/qubes_mcp/policy",
    } | {
        f"/usr/lib/qubes-mcp/{d.relative_to(SRC)}"
        for part in ("dom0", "policy")
        for d in (SRC / "qubes_mcp" / part).rglob("*")
        if d.is_dir() and d.name != "__pycache__"
    }
    assert files == core | dirs | {
        "/usr/lib/qubes-mcp/qubes_mcp/__init__.py",
        "/usr/lib/qubes-mcp/bin/qubes-mcp-admin",
        "/usr/bin/qubes-mcp-admin",
        "/usr/lib/systemd/system/qubes-mcp-gate.service",
        "/usr/share/doc/qubes-mcp-dom0/config.toml.example",
        "/usr/share/licenses/qubes-mcp-dom0/LICENSE",
    }
    assert (
        _query(rpm, "--qf", "%{NAME} %{VERSION} %{ARCH}") == f"qubes-mcp-dom0 {__version__} noarch"
    )


def test_it_needs_nothing_beyond_dom0s_python(rpm: Path) -> None:
    needs = {
        line.strip()
        for line in _query(rpm, "-R").splitlines()
        if line.strip() and not line.startswith("rpmlib(")
    }
    assert needs == {"/bin/sh", "python3 >= 3.11"}


def _payload(rpm: Path, dest: Path) -> Path:
    """Unpack the RPM's payload (rpm2archive writes ``<rpm>.tar`` beside it)."""
    copy = dest / rpm.name
    shutil.copy(rpm, copy)
    subprocess.run(["rpm2archive", "-n", str(copy)], check=True, capture_output=True)
    tar = Path(f"{copy}.tar")
    root = dest / "root"
    with tarfile.open(tar) as t:
        t.extractall(root, filter="tar")
    return root


def test_the_installed_tool_runs_on_bare_python_and_the_unit_is_installs_unit(
    rpm: Path, tmp_path: Path
) -> None:
    root = _payload(rpm, tmp_path)
    launcher = root / "usr/lib/qubes-mcp/bin/qubes-mcp-admin"
    out = subprocess.run(
        ["/usr/bin/env", "-i", "python3", "-I", "-S", str(launcher), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"qubes-mcp-admin {__version__}"
    unit = (root / "usr/lib/systemd/system/qubes-mcp-gate.service").read_text()
    assert unit == UNIT_TEXT.format(
        exe="/usr/bin/qubes-mcp-admin", config="/etc/qubes-mcp/config.toml"
    )


def _scriptlet(rpm: Path, tag: str) -> str:
    return _query(rpm, "--qf", f"%{{{tag}}}")


def _run(script: str, arg: int, tmp_path: Path, *, config: bool) -> list[str]:
    """Run a scriptlet with stubbed systemctl and qubes-mcp-admin; return what they were asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    calls.write_text("")
    for name in ("systemctl", "qubes-mcp-admin"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    cfg = tmp_path / "config.toml"
    cfg.unlink(missing_ok=True)
    if config:
        cfg.write_text("")
    script = script.replace("/usr/bin/qubes-mcp-admin", str(bin_dir / "qubes-mcp-admin"))
    script = script.replace("/etc/qubes-mcp/config.toml", str(cfg))
    subprocess.run(
        ["/bin/sh", "-e", "-c", script, "scriptlet", str(arg)],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        check=True,
    )
    return calls.read_text().splitlines()


def test_first_install_writes_no_policy_and_starts_nothing(rpm: Path, tmp_path: Path) -> None:
    calls = _run(_scriptlet(rpm, "POSTIN"), 1, tmp_path, config=True)
    assert calls == ["systemctl daemon-reload"]


def test_an_upgrade_re_renders_the_policy_and_restarts_the_gate(rpm: Path, tmp_path: Path) -> None:
    assert _run(_scriptlet(rpm, "POSTIN"), 2, tmp_path, config=True) == [
        "systemctl daemon-reload",
        "qubes-mcp-admin install",
    ]
    # without a configuration there is nothing to re-render
    assert _run(_scriptlet(rpm, "POSTIN"), 2, tmp_path, config=False) == ["systemctl daemon-reload"]
    assert _run(_scriptlet(rpm, "PREUN"), 1, tmp_path, config=True) == []
    assert _run(_scriptlet(rpm, "POSTUN"), 1, tmp_path, config=True) == [
        "systemctl daemon-reload",
        "systemctl try-restart qubes-mcp-gate.service",
    ]


def test_removal_stops_the_gate(rpm: Path, tmp_path: Path) -> None:
    assert _run(_scriptlet(rpm, "PREUN"), 0, tmp_path, config=True) == [
        "systemctl disable --now qubes-mcp-gate.service"
    ]
    assert _run(_scriptlet(rpm, "POSTUN"), 0, tmp_path, config=True) == ["systemctl daemon-reload"]
