"""Fail the build when the trust-boundary import rules of DESIGN.md section 7 are broken.

- ``qubes_mcp.dom0`` and ``qubes_mcp.policy`` import only the standard library and each other
  (they run in dom0, which gets no pip).
- ``qubes_mcp.server`` never imports ``qubes_mcp.dom0`` (it reaches dom0 only through a
  transport, exactly as in production).
- ``qubes_mcp.sim`` never reaches ``qubes_mcp.dom0``, neither by import nor by naming it as a
  module to run (``python -m qubes_mcp.dom0...``): the emulator stands for Qubes and must not know
  the gate. What composes the two (``qubes_mcp.stack``) lives outside ``sim/``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "qubes_mcp"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def named_modules(path: Path) -> list[tuple[int, str]]:
    """String constants that name a ``qubes_mcp`` module (``-m qubes_mcp.x`` argv, importlib)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("qubes_mcp.")
    ]


def violations(root: Path = ROOT) -> list[str]:
    bad: list[str] = []
    for part in ("dom0", "policy"):
        for path in sorted((root / part).rglob("*.py")):
            for line, mod in imported_modules(path, root):
                head = mod.split(".")[0]
                trusted = mod.startswith(("qubes_mcp.dom0", "qubes_mcp.policy"))
                if head not in STDLIB and not trusted:
                    bad.append(f"{path}:{line}: {part}/ may not import {mod}")
    for path in sorted((root / "server").rglob("*.py")):
        for line, mod in imported_modules(path, root):
            if mod.startswith("qubes_mcp.dom0"):
                bad.append(f"{path}:{line}: server/ may not import {mod}")
    for path in sorted((root / "sim").rglob("*.py")):
        for line, mod in [*imported_modules(path, root), *named_modules(path)]:
            if mod == "qubes_mcp.dom0" or mod.startswith("qubes_mcp.dom0."):
                bad.append(f"{path}:{line}: sim/ may not import {mod}")
    return bad


def main() -> int:
    bad = violations()
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print(f"{len(bad)} trust-boundary import violation(s)", file=sys.stderr)
        return 1
    print("import rules: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
