"""No principal can slow another (issue 11 §2): one principal's floods, and three under load.

On a stack with three principals in one scope (``stacks.FAIR``), driven on the gate socket
exactly as qrexec drives it:

- ``fair.Info.*``: ``mcp-control``'s ``qmcp.Info`` on ``ai-dev``, one request at a time, while
  ``mcp-second`` floods the gate — nothing (``quiet``), 64 requests held open without EOF
  (``held64``), 500 connections that never send a byte (``silent500``), and both at once. The
  floods are kept up for the whole measurement: a held request the gate refuses (its time to
  arrive is bounded) or a silent connection it drops is opened again at once. The goal is a
  p99 well under 2 s under either flood; ``quiet`` is the baseline beside it. ``silent2000``
  goes beyond the anonymous pool (admission.ANONYMOUS_MAX): the pool sheds its oldest and the
  flood reopens them, so it measures the cost of that churn. Only a dom0 process can open
  such connections (qrexec writes the descriptor as it connects; an agent's silent calls
  carry its name and land in its own share, as ``held64`` does).
- ``fair.load.*``: the three principals at once, 8 clients each calling ``qmcp.Info`` and
  ``qmcp.List`` back to back; one row per principal (p50/p99 of its own requests).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench import stacks
from bench.common import Budget, Result, Sample, measure

VICTIM, FLOODER, THIRD = stacks.FAIR_PRINCIPALS
TARGET = "ai-dev"
HELD = 64
SILENT = 500
#: long enough for held requests to time out and be replaced (request_read_timeout = 5 s)
FLOOD_BUDGET = Budget(count=100_000, seconds=8.0, warmup=3)
LOAD_SECONDS = 10.0
LOAD_CLIENTS = 8


def descriptor(op: str, source: str, target: str | None) -> bytes:
    where = "keyword adminvm" if target is None else f"name {target}"
    return f"qmcp.{op}+ {source} {where}\0".encode()


def request(path: Path, data: bytes) -> bytes:
    """One request as qrexec makes it: a blocking connect (it waits while the backlog is
    full), the descriptor, EOF, the reply to its end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(120)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(1 << 16), b""))


def _call(path: Path, op: str, source: str, target: str | None) -> Callable[[], object]:
    data = descriptor(op, source, target)

    def one() -> object:
        reply = request(path, data)
        if not reply.startswith(b'{"ok":true'):
            raise RuntimeError(f"qmcp.{op} from {source} was refused: {reply[:200]!r}")
        return reply

    return one


class Flood:
    """Keeps ``count`` connections open on the gate socket, each having sent ``data`` (and
    no EOF); one the gate answers or closes is replaced at once."""

    def __init__(self, path: Path, data: bytes, count: int) -> None:
        self.path = path
        self.data = data
        self.count = count
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-flood", daemon=True)
        self._ready = threading.Event()

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.path))
        if self.data:
            sock.sendall(self.data)
        return sock

    def _run(self) -> None:
        poller = select.poll()
        socks: dict[int, socket.socket] = {}
        try:
            for _ in range(self.count):
                sock = self._open()
                socks[sock.fileno()] = sock
                poller.register(sock, select.POLLIN)
            self._ready.set()
            while not self._stop.is_set():
                for fd, _ in poller.poll(100):
                    old = socks.pop(fd)
                    poller.unregister(fd)
                    old.close()
                    sock = self._open()
                    socks[sock.fileno()] = sock
                    poller.register(sock, select.POLLIN)
                    self.reopened += 1
        finally:
            self._ready.set()
            for sock in socks.values():
                sock.close()

    def __enter__(self) -> Flood:
        self._thread.start()
        self._ready.wait(60)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def floods(quick: bool) -> list[Result]:
    s = stacks.stack(stacks.FAIR)
    path = s.root / "run/qubes-mcp/gate.sock"
    info = _call(path, "Info", VICTIM, TARGET)
    budget = FLOOD_BUDGET.scaled(quick)
    held = descriptor("Info", FLOODER, TARGET) + b'{"held'
    rows = []
    for name, what, flood_specs in (
        ("quiet", "no flood", []),
        ("held64", f"{FLOODER} holds {HELD} requests open without EOF", [(held, HELD)]),
        ("silent500", f"{SILENT} connections that never send a byte", [(b"", SILENT)]),
        ("both", f"{HELD} held and {SILENT} silent at once", [(held, HELD), (b"", SILENT)]),
        (
            "silent2000",
            f"{4 * SILENT} silent connections: more than the anonymous pool, which sheds its "
            "oldest",
            [(b"", 4 * SILENT)],
        ),
    ):
        running = [Flood(path, data, count) for data, count in flood_specs]
        for flood in running:
            flood.__enter__()
        try:
            sample = measure(info, budget)
        finally:
            for flood in running:
                flood.__exit__()
        worst = max(sample.latencies)
        replaced = sum(f.reopened for f in running)
        rows.append(
            Result.from_sample(
                f"fair.Info.{name}",
                f"qmcp.Info from {VICTIM} while {what}",
                sample,
                notes=f"max {worst * 1e3:.0f} ms (goal < 2 s)"
                + (f"; flood connections replaced: {replaced}" if running else ""),
                max_s=worst,
                replaced=replaced,
            )
        )
    return rows


def load(quick: bool) -> list[Result]:
    s = stacks.stack(stacks.FAIR)
    path = s.root / "run/qubes-mcp/gate.sock"
    seconds = LOAD_SECONDS / 4 if quick else LOAD_SECONDS
    latencies: dict[str, list[float]] = {p: [] for p in stacks.FAIR_PRINCIPALS}
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(principal: str, index: int) -> None:
        calls = [_call(path, "Info", principal, TARGET), _call(path, "List", principal, None)]
        i = index
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                calls[i % 2]()
                elapsed = time.perf_counter() - t0
                i += 1
                with lock:
                    latencies[principal].append(elapsed)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(p, i), name=f"bench-{p}-{i}")
        for p in stacks.FAIR_PRINCIPALS
        for i in range(LOAD_CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    if errors:
        raise errors[0]
    wall = time.perf_counter() - start
    return [
        Result.from_sample(
            f"fair.load.{p}",
            f"{p}: Info/List, {LOAD_CLIENTS} clients, 3 principals at once",
            Sample(latencies[p], wall),
            notes="per principal",
        )
        for p in stacks.FAIR_PRINCIPALS
    ]


def run(quick: bool) -> list[Result]:
    return floods(quick) + load(quick)
