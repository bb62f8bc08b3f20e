"""Emulated qubesd (issue 2): Admin API requests/s and latency, demo fleet vs 1,000 qubes.

Three calls, each as dom0 over ``ROOT/run/qubesd.sock`` with the R4.3 framing (one request per
connection, as every qubesd client does): ``admin.vm.List`` to dom0 (the whole fleet, O(N)),
``admin.vm.property.Get+netvm`` and ``admin.vm.property.GetAll`` on one qube (should not
depend on N). Each runs sequentially (1 client) and with 8 concurrent clients (threads with
blocking sockets, sharing the budget). qubesd runs in its own process (``qubes-mcp sim run``);
the client is this process.

Run alone: ``.venv/bin/python -m bench --only qubesd``.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import stacks
from bench.common import Budget, Result, measure, measure_concurrent, qubesd_call

CALLS: tuple[tuple[str, str, str, str], ...] = (
    # (short name, dest, method, arg)
    ("List", "dom0", "admin.vm.List", ""),
    ("Get+netvm", "work", "admin.vm.property.Get", "netvm"),
    ("GetAll", "work", "admin.vm.property.GetAll", ""),
)
CLIENTS = (1, 8)
BUDGET = Budget(count=2000, seconds=3.0, warmup=10)


def _caller(kind: str, dest: str, method: str, arg: str) -> Callable[[], bytes]:
    sock = stacks.stack(kind).paths.qubesd_sock

    def one() -> bytes:
        return qubesd_call(sock, dest, method, arg)

    return one


def run(quick: bool) -> list[Result]:
    budget = BUDGET.scaled(quick)
    results: list[Result] = []
    p50: dict[tuple[str, str], float] = {}
    sizes: dict[str, int] = {}
    for kind in (stacks.DEMO, stacks.BIG):
        sizes[kind] = stacks.qube_count(stacks.stack(kind))
        for short, dest, method, arg in CALLS:
            fn = _caller(kind, dest, method, arg)
            reply_bytes = len(fn())
            for clients in CLIENTS:
                if clients == 1:
                    sample = measure(fn, budget)
                else:
                    sample = measure_concurrent(fn, budget, clients)
                row = Result.from_sample(
                    f"qubesd.{short}",
                    f"{method}{'+' + arg if arg else ''} → {dest}, N={sizes[kind]}, "
                    f"{clients} client{'s' if clients > 1 else ''}",
                    sample,
                    notes=f"reply {reply_bytes:,} B",
                    qubes=sizes[kind],
                    clients=clients,
                    reply_bytes=reply_bytes,
                )
                if clients == 1 and row.p50 is not None:
                    p50[(kind, short)] = row.p50
                results.append(row)
    _add_scaling_notes(results, p50, sizes)
    return results


def _add_scaling_notes(
    results: list[Result], p50: dict[tuple[str, str], float], sizes: dict[str, int]
) -> None:
    """On each 1,000-qube sequential row: how its p50 moved from the demo fleet's."""
    small, big = sizes[stacks.DEMO], sizes[stacks.BIG]
    for row in results:
        if row.extra.get("qubes") != big or row.extra.get("clients") != 1:
            continue
        short = row.name.removeprefix("qubesd.")
        before, after = p50.get((stacks.DEMO, short)), p50.get((stacks.BIG, short))
        if before is None or after is None:
            continue
        ratio = after / before
        row.extra["p50_ratio_vs_demo"] = round(ratio, 2)
        per_qube = (after - before) / (big - small) * 1e6
        row.extra["p50_us_per_extra_qube"] = round(per_qube, 2)
        row.notes += f"; p50 ×{ratio:.1f} vs {small} qubes ({per_qube:+.1f} µs/qube)"
