"""Audit log append throughput and latency (appends/s, p50, p99). Not a test.

Part of ``python -m bench`` (``--only audit``); alone, with its own options:
``.venv/bin/python -m bench.bench_audit [--n 2000] [--dir DIR]``. Each append is
durable (line fsync, anchor temp-file fsync, rename, directory fsync), so the numbers are
dominated by the storage's fsync latency; run it on the file system the gate will use.
The second phase starts from a log several MiB long to show that append cost does not grow
with the log (bytes read per append are printed too).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import Budget, Result, Sample
from qubes_mcp.dom0.audit.log import AuditLog

BUDGET = Budget(count=2000, seconds=4.0, warmup=0)
#: the second phase starts from a log at least this long (quick: a quarter)
GROWN_BYTES = 2 * 1024 * 1024


def append_many(log: AuditLog, n: int, seconds: float = float("inf")) -> list[float]:
    """Append up to ``n`` typical records (for at most about ``seconds``); return each
    append's latency in seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    for i in range(n):
        if latencies and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        log.append(
            principal="work-agent",
            op="qmcp.Run",
            targets=["work-web"],
            decision="allowed",
            outcome="ok",
            request_id=f"r{i:08d}",
            detail={"command_sha256": "ab" * 32, "command_bytes": 42, "exit_code": 0},
        )
        latencies.append(time.perf_counter() - start)
    return latencies


def _row(name: str, what: str, log: AuditLog, budget: Budget) -> Result:
    before = log.reads.bytes_read
    start = time.perf_counter()
    latencies = append_many(log, budget.count, budget.seconds)
    sample = Sample(latencies, time.perf_counter() - start)
    per_append = (log.reads.bytes_read - before) / max(1, len(latencies))
    return Result.from_sample(
        name,
        what,
        sample,
        notes=f"durable (2 fsync + rename + dir fsync); {per_append:.0f} B read/append",
        bytes_read_per_append=round(per_append),
    )


def run(quick: bool) -> list[Result]:
    """The runner's entry: an empty log, then one grown by another writer (O(1) check)."""
    budget = BUDGET.scaled(quick)
    grown = GROWN_BYTES // 4 if quick else GROWN_BYTES
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-bench-audit-") as tmp:
        path = Path(tmp) / "log" / "audit.log"
        log = AuditLog(path, max_bytes=64 * 1024 * 1024)
        rows = [_row("audit.append", "AuditLog.append, empty log (in the temp dir)", log, budget)]
        grow = AuditLog(path, max_bytes=64 * 1024 * 1024)
        while path.stat().st_size < grown:
            append_many(grow, 200)
        size = path.stat().st_size
        rows.append(
            _row(
                "audit.append-grown",
                f"AuditLog.append, {size / (1 << 20):.1f} MiB log grown by another writer",
                log,
                budget,
            )
        )
        grow.close()
        log.close()
    return rows


def report(label: str, latencies: list[float], bytes_read: int) -> None:
    cuts = statistics.quantiles(latencies, n=100)
    total = sum(latencies)
    print(
        f"{label}: {len(latencies) / total:8.0f} appends/s  "
        f"p50 {cuts[49] * 1e3:6.2f} ms  p99 {cuts[98] * 1e3:6.2f} ms  "
        f"{bytes_read / len(latencies):6.0f} bytes read/append"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "log" / "audit.log"
        log = AuditLog(path, max_bytes=64 * 1024 * 1024)
        before = log.reads.bytes_read
        report("empty log ", append_many(log, args.n), log.reads.bytes_read - before)
        grow = AuditLog(path, max_bytes=64 * 1024 * 1024)
        # Grown by another instance, so `log` must re-validate its tail on its next append.
        while path.stat().st_size < 2 * 1024 * 1024:
            append_many(grow, 200)
        before = log.reads.bytes_read
        size = path.stat().st_size
        report(f"{size >> 20} MiB log", append_many(log, args.n), log.reads.bytes_read - before)


if __name__ == "__main__":
    main()
