"""``python -m bench [--quick] [--only NAME] [--json FILE] [--list]``: every benchmark, one table.

A benchmark is any module ``bench/bench_<name>.py`` with ``run(quick: bool) -> list[Result]``
(``bench.common.Result``); new ones are picked up without touching this file. One that fails
becomes a ``FAILED`` row and the others still run. The emulated dom0s the benchmarks share
are stopped and removed at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench
from bench import stacks
from bench.common import Result, fmt_rate, fmt_time

#: run first, in this order; any other bench_* module follows alphabetically
ORDER = ("policy", "qubesd", "router", "gate", "audit", "mcp")
COLUMNS = ("name", "what", "n", "p50", "p99", "mean", "rps", "notes")

Runner = Callable[[bool], list[Result]]


def discover() -> list[str]:
    """Short names of every ``bench_<name>`` module, in run order (nothing imported yet: a
    benchmark whose dependencies are missing must not stop the others)."""
    found = [
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(bench.__path__)
        if m.name.startswith("bench_")
    ]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda name: (rank.get(name, len(ORDER)), name))


def load(name: str) -> Runner | None:
    """The module's ``run(quick)``, or None when it has none (a helper, not a benchmark)."""
    module = importlib.import_module(f"bench.bench_{name}")
    run = getattr(module, "run", None)
    if not callable(run) or "quick" not in inspect.signature(run).parameters:
        return None
    runner: Runner = run
    return runner


def select(available: list[str], only: Sequence[str]) -> list[str]:
    if not only:
        return available
    wanted = {w.removeprefix("bench_") for item in only for w in item.split(",") if w}
    unknown = wanted - set(available)
    if unknown:
        raise SystemExit(
            f"unknown benchmark(s) {', '.join(sorted(unknown))}; available: {', '.join(available)}"
        )
    return [name for name in available if name in wanted]


def _failed(name: str, exc: BaseException) -> Result:
    traceback.print_exc()
    return Result(name, "(benchmark failed)", 0, notes=f"FAILED: {exc!r}"[:300])


def run_all(selected: list[str], quick: bool) -> list[Result]:
    results: list[Result] = []
    try:
        for name in selected:
            try:
                run = load(name)
            except Exception as exc:  # noqa: BLE001 - e.g. an optional dependency is missing
                results.append(_failed(name, exc))
                continue
            if run is None:
                print(f"[bench] {name}: no run(quick), not a benchmark", file=sys.stderr)
                continue
            print(f"[bench] {name} …", file=sys.stderr, flush=True)
            start = time.monotonic()
            try:
                rows = run(quick)
            except Exception as exc:  # noqa: BLE001 - one failure must not hide the others
                rows = [_failed(name, exc)]
            print(
                f"[bench] {name}: {len(rows)} rows in {time.monotonic() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            results.extend(rows)
    finally:
        stacks.close_all()
    return results


def cells(r: Result) -> list[str]:
    return [
        r.name,
        r.what,
        str(r.n),
        fmt_time(r.p50),
        fmt_time(r.p99),
        fmt_time(r.mean),
        fmt_rate(r.rps),
        r.notes,
    ]


def table(results: Sequence[Result]) -> str:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    rows = [list(COLUMNS), *(cells(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    right = {2, 3, 4, 5, 6}

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(rows[0]), rule + "|", *(line(r) for r in rows[1:])])


def meta(quick: bool, elapsed: float) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m_at_end": round(load[0], 2),
        "elapsed_s": round(elapsed, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this benchmark (repeatable, or comma-separated), e.g. qubesd,gate",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    selected = select(available, args.only)
    start = time.monotonic()
    results = run_all(selected, args.quick)
    info = meta(args.quick, time.monotonic() - start)
    print(
        f"\nqubes-mcp benchmarks — {info['date_utc']}, {info['cpus']} CPUs, "
        f"Python {info['python']}, {'quick' if args.quick else 'full'} run, "
        f"{info['elapsed_s']} s, load {info['loadavg_1m_at_end']}\n"
    )
    print(table(results))
    if args.json is not None:
        doc = {"meta": info, "results": [r.to_json() for r in results]}
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if any(r.notes.startswith("FAILED") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
