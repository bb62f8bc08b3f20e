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
#: 1,000 qubes of which only the demo fleet's are enrolled: the scope is the demo's, the rest
#: is hidden (issue 7 §5: a listing must cost what the scope costs, not what the host holds)
HIDDEN = "hidden"
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


def _extra_count(total: int) -> int:
    """How many generated qubes bring the demo fleet (and dom0) up to ``total``."""
    return total - len(tomllib.loads(demo_fleet_text())["qube"]) - 1


def hidden_fleet_text(total: int = BIG_SIZE) -> str:
    """The demo fleet plus untagged AppVMs up to ``total`` qubes, a quarter of them named
    inside the agent's prefix (``ai-op-…``): none is enrolled by ``install``'s migration."""
    parts = [demo_fleet_text()]
    for i in range(_extra_count(total)):
        name = f"ai-op-{i:04d}" if i % 4 == 3 else f"op-{i:04d}"
        parts.append(f'\n[[qube]]\nname = "{name}"\nclass = "AppVM"\nlabel = "gray"\n')
    return "".join(parts)


def _stray_tags(s: Stack, total: int = BIG_SIZE) -> None:
    """After install, copied scope and tier tags on some of the hidden qubes (what the
    operator's disposables and clones of enrolled qubes carry): still in no scope."""
    for i in range(0, _extra_count(total), 4):
        for tag in ("ai-managed", "ai-exec"):
            qubesd_call(s.paths.qubesd_sock, f"op-{i:04d}", "admin.vm.tag.Set", tag)


def _unlimited(text: str) -> str:
    """The installed configuration without the per-principal rate limit: the benchmarks
    measure the gate's work, and a few hundred calls a second are their point."""
    return text + "\n[limits]\nrate = 100000\nburst = 100000\n"


def stack(kind: str) -> Stack:
    """The running stack of ``kind`` (:data:`DEMO`, :data:`BIG` or :data:`HIDDEN`), started
    on first use."""
    if kind in _stacks:
        return _stacks[kind]
    tmp = Path(tempfile.mkdtemp(prefix=f"qubes-mcp-bench-{kind}-"))
    _dirs.append(tmp)
    fleet = None
    edit = _unlimited
    if kind in (BIG, HIDDEN):
        fleet = tmp / "fleet.toml"
        fleet.write_text(big_fleet_text() if kind == BIG else hidden_fleet_text())
    elif kind == FAIR:
        edit = lambda text: _unlimited(_more_principals(text))  # noqa: E731
    elif kind != DEMO:
        raise ValueError(f"unknown stack {kind!r}")
    _stacks[kind] = start_stack(tmp / "root", fleet=fleet, config_edit=edit, timeout=300)
    if kind == HIDDEN:
        _stray_tags(_stacks[kind])
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
