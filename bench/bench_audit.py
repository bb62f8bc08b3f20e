"""Audit log append throughput and latency (appends/s, p50, p99). Not a test.

Run: ``.venv/bin/python bench/bench_audit.py [--n 2000] [--dir DIR]``. Each append is
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

from qubes_mcp.dom0.audit import AuditLog


def run(log: AuditLog, n: int) -> list[float]:
    """Append ``n`` typical records; return each append's latency in seconds."""
    latencies = []
    for i in range(n):
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
        report("empty log ", run(log, args.n), log.reads.bytes_read - before)
        grow = AuditLog(path, max_bytes=64 * 1024 * 1024)
        # Grown by another instance, so `log` must re-validate its tail on its next append.
        while path.stat().st_size < 2 * 1024 * 1024:
            run(grow, 200)
        before = log.reads.bytes_read
        size = path.stat().st_size
        report(f"{size >> 20} MiB log", run(log, args.n), log.reads.bytes_read - before)


if __name__ == "__main__":
    main()
