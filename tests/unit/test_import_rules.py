"""The trust boundary is visible in imports: dom0/ and policy/ use only the standard library,
server/ never imports dom0/ (DESIGN.md section 7), and the emulator (sim/) never knows the gate.
The build fails when this breaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "check_imports.py"
spec = importlib.util.spec_from_file_location("check_imports", TOOLS)
assert spec is not None and spec.loader is not None
check_imports = importlib.util.module_from_spec(spec)
sys.modules["check_imports"] = check_imports
spec.loader.exec_module(check_imports)


def test_the_tree_keeps_the_import_rules() -> None:
    assert check_imports.violations() == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "qubes_mcp"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_third_party_import_in_dom0_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"dom0/gate.py": "import fastmcp\n", "policy/x.py": "import json\n"})
    assert [v.split(": ", 1)[1] for v in check_imports.violations(root)] == [
        "dom0/ may not import fastmcp"
    ]


def test_policy_importing_the_emulator_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"policy/x.py": "from qubes_mcp.sim import exc\n"})
    assert len(check_imports.violations(root)) == 1


def test_server_importing_dom0_relatively_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"server/tools.py": "from ..dom0 import gate\n"})
    assert check_imports.violations(root) == [
        f"{root / 'server/tools.py'}:1: server/ may not import qubes_mcp.dom0"
    ]


def test_the_emulator_importing_the_gate_is_caught(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "sim/a.py": "from qubes_mcp.dom0.operator.install import Layout\n",
            "sim/b.py": "from ..dom0 import gate\n",
            "sim/qrexec/c.py": "import qubes_mcp.dom0\n",
        },
    )
    assert [v.split(": ", 1)[1] for v in check_imports.violations(root)] == [
        "sim/ may not import qubes_mcp.dom0.operator.install",
        "sim/ may not import qubes_mcp.dom0",
        "sim/ may not import qubes_mcp.dom0",
    ]


def test_the_emulator_running_the_gate_as_a_module_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"sim/s.py": 'ARGV = ["python", "-m", "qubes_mcp.dom0.operator.cli"]\n'})
    assert [v.split(": ", 1)[1] for v in check_imports.violations(root)] == [
        "sim/ may not import qubes_mcp.dom0.operator.cli"
    ]


def test_the_composition_outside_the_emulator_may_use_both(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"stack.py": "from qubes_mcp.dom0.operator.install import Layout\n"})
    assert check_imports.violations(root) == []
