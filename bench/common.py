"""What every benchmark shares: the Result row, bounded timing loops, raw socket clients.

Every loop here is bounded twice, by a request count and by a time budget, and stops at
whichever comes first; a benchmark can never run away on a loaded machine. Latencies are
wall-clock (``time.perf_counter``) around one whole request, client side, so they include
what a real caller pays (connect, framing, the server's work, the reply).
"""

from __future__ import annotations

import math
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: the repository root: one-shot subprocesses run from here so ``bench`` is importable
REPO = Path(__file__).resolve().parents[1]
#: the most a raw socket reply may be (a 1,000-qube admin.vm.List is ~100 KiB)
MAX_REPLY = 16 << 20


@dataclass
class Result:
    """One row of the table. Times are seconds; ``None`` where a column does not apply."""

    name: str
    what: str
    n: int
    p50: float | None = None
    p99: float | None = None
    mean: float | None = None
    rps: float | None = None
    notes: str = ""
    #: machine-readable extras for ``--json`` (round trips, fleet size, ratios …)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sample(
        cls, name: str, what: str, sample: Sample, notes: str = "", **extra: Any
    ) -> Result:
        lat = sorted(sample.latencies)
        return cls(
            name=name,
            what=what,
            n=len(lat),
            p50=percentile(lat, 0.50),
            p99=percentile(lat, 0.99),
            mean=statistics.fmean(lat) if lat else None,
            rps=len(lat) / sample.wall if sample.wall > 0 and lat else None,
            notes=notes,
            extra=extra,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("p50", "p99", "mean"):
            value = data.pop(key)
            data[f"{key}_ms"] = None if value is None else round(value * 1e3, 6)
        data["rps"] = None if self.rps is None else round(self.rps, 1)
        return data


def skipped(name: str, what: str, why: str) -> Result:
    """A row for a benchmark that could not run here (the table says why)."""
    return Result(name=name, what=what, n=0, notes=f"SKIPPED: {why}")


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (p99 of 50 samples is the max)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Sample:
    latencies: list[float]
    #: wall time of the whole measured phase (for requests/s, which counts concurrency)
    wall: float


@dataclass(frozen=True)
class Budget:
    """At most ``count`` measured requests and about ``seconds`` of measuring."""

    count: int
    seconds: float
    warmup: int = 3

    def scaled(self, quick: bool) -> Budget:
        """The ``--quick`` version: a tenth of the requests, a quarter of the time."""
        if not quick:
            return self
        return Budget(max(3, self.count // 10), self.seconds / 4, min(self.warmup, 2))


def measure(fn: Callable[[], object], budget: Budget) -> Sample:
    """Call ``fn`` sequentially until the budget's count or time runs out."""
    for _ in range(budget.warmup):
        fn()
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + budget.seconds
    while len(latencies) < budget.count:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    return Sample(latencies, time.perf_counter() - start)


def measure_concurrent(fn: Callable[[], object], budget: Budget, clients: int) -> Sample:
    """``clients`` threads calling ``fn`` back to back, sharing one count and time budget.

    Threads, not asyncio: each client is a blocking socket that releases the GIL while the
    server works, which is how independent callers look to the server.
    """
    for _ in range(budget.warmup):
        fn()
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = time.perf_counter()
    deadline = start + budget.seconds

    def client() -> None:
        try:
            while True:
                with lock:
                    if len(latencies) >= budget.count or time.perf_counter() > deadline:
                        return
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=budget.seconds + 120)
    if errors:
        raise errors[0]
    return Sample(latencies, time.perf_counter() - start)


async def measure_async(fn: Callable[[], Awaitable[object]], budget: Budget) -> Sample:
    """:func:`measure` for a coroutine function, inside the caller's event loop."""
    for _ in range(budget.warmup):
        await fn()
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + budget.seconds
    while len(latencies) < budget.count:
        t0 = time.perf_counter()
        await fn()
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    return Sample(latencies, time.perf_counter() - start)


def unix_request(path: Path, data: bytes, *, timeout: float = 120.0) -> bytes:
    """One request on a one-request-per-connection Unix socket: send, EOF, read to EOF.

    This is the framing of both qubesd's sockets and qrexec socket services (the gate).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        size = 0
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise RuntimeError(f"reply from {path} is larger than {MAX_REPLY} bytes")
    return b"".join(chunks)


def qubesd_call(sock: Path, dest: str, method: str, arg: str = "", payload: bytes = b"") -> bytes:
    """One Admin API call as dom0 (what ``qubesd-query`` sends); raises unless it succeeded."""
    reply = unix_request(sock, f"{method}+{arg} dom0 name {dest}\0".encode() + payload)
    if not reply.startswith(b"0\0"):
        raise RuntimeError(f"{method}+{arg} on {dest} failed: {reply[:200]!r}")
    return reply[2:]


def bwrap_problem() -> str | None:
    """Why commands cannot run in emulated qubes here, or None when bubblewrap works."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed"
    probe = subprocess.run(
        [exe, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.decode(errors='replace')}"
    return None


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rps: float | None) -> str:
    if rps is None:
        return "-"
    if rps >= 100:
        return f"{rps:,.0f}"
    return f"{rps:.1f}"
