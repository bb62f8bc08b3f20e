"""The emulated dom0s the benchmarks measure: the demo fleet and a generated 1,000-qube one.

Each is a real stack (``qubes-mcp sim run`` + ``qubes-mcp-admin install --root`` +
``qubes-mcp-admin gate``, all subprocesses, see ``qubes_mcp.stack``) on a temporary root,
started on first use and shared by every benchmark of one run, then stopped and removed by
:func:`close_all` (the runner calls it; ``atexit`` is the safety net for a lone module).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import tomllib
from pathlib import Path

from bench.common import qubesd_call
from qubes_mcp.sim.fleet import demo_fleet_text
from qubes_mcp.stack import Stack, start_stack

DEMO = "demo"
BIG = "big"
#: the demo fleet with three principals in one scope (bench_fairness)
FAIR = "fair"
FAIR_PRINCIPALS = ("mcp-control", "mcp-second", "mcp-third")
#: qubes in the generated fleet, dom0 included (what ``admin.vm.List`` returns)
BIG_SIZE = 1000

_LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
_stacks: dict[str, Stack] = {}
_dirs: list[Path] = []


def big_fleet_text(total: int = BIG_SIZE) -> str:
    """The demo fleet plus generated AppVMs up to ``total`` qubes (dom0 counted).

    Half the extra qubes are enrolled in the gate's ``ai`` scope (a quarter at ``exec``), so
    the gate's List has real work to do on every other qube; half have no netvm.
    """
    demo = demo_fleet_text()
    existing = len(tomllib.loads(demo)["qube"]) + 1
    parts = [demo]
    for i in range(total - existing):
        tags = ""
        if i % 2 == 0:
            tags = 'tags = ["ai-managed", "ai-exec"]\n' if i % 4 == 0 else 'tags = ["ai-managed"]\n'
        props = 'properties = { netvm = "" }\n' if i % 2 else ""
        parts.append(
            f'\n[[qube]]\nname = "bench-{i:04d}"\nclass = "AppVM"\n'
            f'label = "{_LABELS[i % len(_LABELS)]}"\n{tags}{props}'
        )
    return "".join(parts)


def stack(kind: str) -> Stack:
    """The running stack of ``kind`` (:data:`DEMO` or :data:`BIG`), started on first use."""
    if kind in _stacks:
        return _stacks[kind]
    tmp = Path(tempfile.mkdtemp(prefix=f"qubes-mcp-bench-{kind}-"))
    _dirs.append(tmp)
    fleet = None
    edit = None
    if kind == BIG:
        fleet = tmp / "fleet.toml"
        fleet.write_text(big_fleet_text())
    elif kind == FAIR:
        edit = _more_principals
    elif kind != DEMO:
        raise ValueError(f"unknown stack {kind!r}")
    _stacks[kind] = start_stack(tmp / "root", fleet=fleet, config_edit=edit, timeout=300)
    return _stacks[kind]


def _more_principals(text: str) -> str:
    """The installed configuration plus the other principals of :data:`FAIR_PRINCIPALS`."""
    extra = "".join(
        f'[[principal]]\nqube = "{qube}"\nscope = "ai"\nceiling = "full"\nname_prefix = "p{i}-"\n\n'
        for i, qube in enumerate(FAIR_PRINCIPALS[1:], start=2)
    )
    return text.replace("[budget]", extra + "[budget]")


def qube_count(s: Stack) -> int:
    """How many qubes ``admin.vm.List`` reports (dom0 included)."""
    return len(qubesd_call(s.paths.qubesd_sock, "dom0", "admin.vm.List").splitlines())


def close_all() -> None:
    """Stop every stack started here and remove its temporary root."""
    while _stacks:
        _, s = _stacks.popitem()
        s.stop()
    while _dirs:
        shutil.rmtree(_dirs.pop(), ignore_errors=True)


atexit.register(close_all)
