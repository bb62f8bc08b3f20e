"""The dom0 gate (issue 3): per-call cost of the daemon vs a fresh Python process per call.

For ``qmcp.List``, ``qmcp.Info`` (on ``ai-dev``) and ``qmcp.Run ["true"]`` (on ``ai-dev``),
side by side:

- ``daemon``: the running ``qubes-mcp-admin gate``, driven through its socket exactly as
  qrexec drives it (descriptor ``qmcp.Op+ mcp-control keyword adminvm|name QUBE\\0``, payload,
  EOF; one JSON reply);
- ``router``: the same daemon reached through the emulated qrexec router as the principal's
  qube (``sim/qrexec/client.call``): what the MCP server in ``mcp-control`` really waits for;
- ``oneshot``: ``python -m bench.gate_oneshot`` per call, the same request on its stdin: the
  prior art's model (interpreter start, imports, config load, then the very same
  ``Gate.handle``).

Then ``qmcp.List`` on the demo fleet and on 1,000 qubes whose scope is the demo's (the others
hidden), interleaved, on the daemon and through the router (issue 7 §5: the gate's part must
stay within 2×; the router's own ``internal.GetSystemInfo`` per call is shown beside it, since
R4.3's qrexec reads the whole host per call too). Then the qubesd round trips per operation,
counted by ``AdminClient.round_trips`` on an in-process ``Gate`` (same config, its own audit
log): ``List`` with the demo fleet and with 1,000 qubes (two reads per registered name of the
scope, never a walk of the host), and ``Info``/``Start``/``Run`` with both fleets (constant).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import stacks
from bench.common import (
    REPO,
    Budget,
    Result,
    Sample,
    bwrap_problem,
    measure,
    measure_async,
    skipped,
    unix_request,
)
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import GateConfig, load_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.gate import Gate, Request
from qubes_mcp.sim.qrexec.client import call as qrexec_call
from qubes_mcp.stack import PRINCIPAL, Stack

EXEC_QUBE = "ai-dev"
RUN_PAYLOAD = {"command": ["true"]}
#: (op, qrexec target as the descriptor names it, payload, needs bwrap)
OPS: tuple[tuple[str, str | None, dict[str, Any] | None, bool], ...] = (
    ("List", None, None, False),
    ("Info", EXEC_QUBE, None, False),
    ("Run", EXEC_QUBE, RUN_PAYLOAD, True),
)
FAST = Budget(count=300, seconds=4.0, warmup=5)  # List/Info on the daemon
SLOW = Budget(count=40, seconds=8.0, warmup=2)  # anything that starts a process per call
BIG_LIST = Budget(count=20, seconds=6.0, warmup=1)
SCOPE_LIST = Budget(count=200, seconds=6.0, warmup=5)  # per fleet, interleaved


def descriptor(op: str, target: str | None) -> bytes:
    """What qrexec writes first on a socket service's connection."""
    where = "keyword adminvm" if target is None else f"name {target}"
    return f"qmcp.{op}+ {PRINCIPAL} {where}\0".encode()


def _payload(payload: dict[str, Any] | None) -> bytes:
    return b"" if payload is None else json.dumps(payload).encode()


def _check(op: str, raw: bytes) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(raw)
    if reply.get("ok") is not True:
        raise RuntimeError(f"qmcp.{op} was refused: {reply}")
    return reply


def _daemon(config: GateConfig, op: str, target: str | None, body: bytes) -> Callable[[], object]:
    request = descriptor(op, target) + body

    def one() -> object:
        return _check(op, unix_request(config.paths.gate_socket, request))

    return one


def _oneshot(s: Stack, op: str, target: str | None, body: bytes) -> Callable[[], object]:
    argv = [sys.executable, "-m", "bench.gate_oneshot", "--config", str(s.config)]
    request = descriptor(op, target) + body

    def one() -> object:
        done = subprocess.run(
            argv, input=request, capture_output=True, cwd=REPO, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"one-shot gate failed: {done.stderr.decode(errors='replace')}")
        return _check(op, done.stdout)

    return one


def _via_router(
    s: Stack, op: str, target: str | None, body: bytes
) -> Callable[[], Awaitable[object]]:
    async def one() -> object:
        result = await qrexec_call(
            s.paths,
            source=PRINCIPAL,
            target=target or "@adminvm",
            service_and_arg=f"qmcp.{op}",
            stdin=body,
            timeout=120,
        )
        if result.exit_code != 0:
            raise RuntimeError(f"qmcp.{op} via qrexec: exit {result.exit_code} {result.stderr!r}")
        return _check(op, result.stdout)

    return one


def _ratio_note(fast: Result | None, slow: Result) -> str:
    if fast is None or fast.p50 is None or slow.p50 is None:
        return ""
    return f"p50 ×{slow.p50 / fast.p50:.1f} the daemon's"


def _startup_baseline(quick: bool) -> list[Result]:
    """Where a one-shot call's time goes: a bare interpreter, then the gate's imports."""
    rows = []
    for name, code, what in (
        ("gate.oneshot-python", "pass", "fresh `python -c pass` (interpreter start only)"),
        (
            "gate.oneshot-imports",
            "import bench.gate_oneshot",
            "fresh python importing the gate (no config, no request)",
        ),
    ):
        argv = [sys.executable, "-c", code]

        def one(argv: list[str] = argv) -> object:
            return subprocess.run(argv, capture_output=True, cwd=REPO, timeout=60, check=True)

        rows.append(
            Result.from_sample(
                name, what, measure(one, SLOW.scaled(quick)), notes="baseline for *.oneshot"
            )
        )
    return rows


def side_by_side(quick: bool) -> list[Result]:
    s = stacks.stack(stacks.DEMO)
    config = load_config(s.config)
    n = stacks.qube_count(s)
    no_bwrap = bwrap_problem()
    results: list[Result] = []
    for op, target, payload, needs_bwrap in OPS:
        where = "@adminvm" if target is None else target
        label = f"qmcp.{op} → {where}" + (' ["true"]' if op == "Run" else "") + f", N={n}"
        if needs_bwrap and no_bwrap is not None:
            results.append(skipped(f"gate.{op}", label, no_bwrap))
            continue
        body = _payload(payload)
        budget = (SLOW if needs_bwrap else FAST).scaled(quick)
        daemon = Result.from_sample(
            f"gate.{op}.daemon",
            f"{label}: gate daemon socket",
            measure(_daemon(config, op, target, body), budget),
            notes="as qrexec drives it",
            qubes=n,
        )
        router = Result.from_sample(
            f"gate.{op}.router",
            f"{label}: via qrexec router from {PRINCIPAL}",
            asyncio.run(measure_async(_via_router(s, op, target, body), budget)),
            notes="what the MCP server waits for",
            qubes=n,
        )
        oneshot = Result.from_sample(
            f"gate.{op}.oneshot",
            f"{label}: fresh python per call",
            measure(_oneshot(s, op, target, body), SLOW.scaled(quick)),
            qubes=n,
        )
        oneshot.notes = _ratio_note(daemon, oneshot)
        results += [daemon, router, oneshot]
    results += _startup_baseline(quick)
    big = stacks.stack(stacks.BIG)
    big_config = load_config(big.config)
    n_big = stacks.qube_count(big)
    results.append(
        Result.from_sample(
            "gate.List.daemon",
            f"qmcp.List → @adminvm, N={n_big}: gate daemon socket",
            measure(_daemon(big_config, "List", None, b""), BIG_LIST.scaled(quick)),
            notes="fresh reads: three per registered name (499 in scope)",
            qubes=n_big,
        )
    )
    return results


async def _count(
    gate: Gate, op: str, target: str | None, body: bytes
) -> tuple[int, float, dict[str, Any]]:
    before = gate.admin.round_trips
    t0 = time.perf_counter()
    reply = await gate.handle(Request(f"qmcp.{op}", PRINCIPAL, target, body))
    elapsed = time.perf_counter() - t0
    if reply.get("ok") is not True:
        raise RuntimeError(f"qmcp.{op} on {target} was refused: {reply}")
    result: dict[str, Any] = reply["result"]
    return gate.admin.round_trips - before, elapsed, result


async def _round_trips(kind: str, target: str, bwrap: bool) -> list[Result]:
    """List, then Info, Start and Run on one halted in-scope qube ``target``."""
    s = stacks.stack(kind)
    config = load_config(s.config)
    n = stacks.qube_count(s)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-bench-audit-") as tmp:
        audit = AuditLog(Path(tmp) / "audit.log", create=True)
        gate = Gate(config, audit, ConsentBroker(config.consent.timeout, None))
        trips, elapsed, result = await _count(gate, "List", None, b"")
        in_scope = len(result["qubes"])
        # three fresh reads per registered name (members and dump sinks): its tags, its
        # listing line, its properties (reader.py; the properties say DispVMTemplate, netvm
        # and the rest qube.list shows); this first request of the gate also reconciles the
        # registry once (one host-wide list, operator-side)
        bound = 3 * (in_scope + len(result["dump_sinks"])) + 2
        verdict = f"≤ 3×scope+2 = {bound} ✓" if trips <= bound else f"> 3×scope+2 = {bound} ✗"
        rows.append(
            Result(
                "gate.trips.List",
                f"qubesd round trips, one qmcp.List, N={n} ({in_scope} in scope)",
                1,
                p50=elapsed,
                notes=f"{trips} round trips ({verdict})",
                extra={"round_trips": trips, "qubes": n, "in_scope": in_scope},
            )
        )
        ops: list[tuple[str, bytes]] = [("Info", b"")]
        if bwrap:
            ops += [("Start", b""), ("Run", _payload(RUN_PAYLOAD))]
        for op, body in ops:
            trips, elapsed, _ = await _count(gate, op, target, body)
            rows.append(
                Result(
                    f"gate.trips.{op}",
                    f"qubesd round trips, one qmcp.{op} → {target}, N={n}",
                    1,
                    p50=elapsed,
                    notes=f"{trips} round trips",
                    extra={"round_trips": trips, "qubes": n},
                )
            )
        audit.close()
    return rows


def round_trips() -> list[Result]:
    bwrap = bwrap_problem() is None
    rows = asyncio.run(_round_trips(stacks.DEMO, "ai-build", bwrap))
    small = {r.name: r.extra["round_trips"] for r in rows}
    # the same qube in both fleets (its references decide how many reads Info makes)
    big = asyncio.run(_round_trips(stacks.BIG, "ai-build", bwrap))
    for row in big:
        before = small.get(row.name)
        if row.name != "gate.trips.List" and before is not None:
            same = row.extra["round_trips"] == before
            row.notes += " (same as the demo fleet: constant ✓)" if same else f" (was {before} ✗)"
    rows += big
    if not bwrap:
        rows.append(skipped("gate.trips.Start/Run", "round trips of Start and Run", "no bwrap"))
    return rows


def _interleaved(fns: Sequence[Callable[[], object]], budget: Budget) -> list[Sample]:
    """Call each of ``fns`` in turn (order alternating per round) until the budget runs out,
    so that the load of the shared machine falls on every one alike."""
    for _ in range(budget.warmup):
        for fn in fns:
            fn()
    samples = [Sample([], 0.0) for _ in fns]
    start = time.perf_counter()
    deadline = start + budget.seconds * len(fns)
    rounds = 0
    while rounds < budget.count and time.perf_counter() < deadline:
        order = list(range(len(fns)))
        if rounds % 2:
            order.reverse()
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            samples[i].latencies.append(time.perf_counter() - t0)
        rounds += 1
    wall = time.perf_counter() - start
    for sample in samples:
        sample.wall = wall / len(fns)
    return samples


def listing_scales_with_scope(quick: bool) -> list[Result]:
    """``qmcp.List`` on the demo fleet and on 1,000 qubes whose scope is the demo's (the
    others hidden, some carrying copied scope tags), side by side and interleaved: the daemon
    socket and the whole qrexec path. Goal (issue 7 §5): p50 within 2× of the demo's."""
    demo, hidden = stacks.stack(stacks.DEMO), stacks.stack(stacks.HIDDEN)
    n_demo, n_hidden = stacks.qube_count(demo), stacks.qube_count(hidden)
    rows: list[Result] = []
    for path in ("daemon", "router"):
        if path == "daemon":
            fns = [_daemon(load_config(s.config), "List", None, b"") for s in (demo, hidden)]
            samples = _interleaved(fns, SCOPE_LIST.scaled(quick))
        else:

            def sync(s: Stack) -> Callable[[], object]:
                one = _via_router(s, "List", None, b"")

                async def go() -> object:
                    return await one()

                return lambda: asyncio.run(go())

            samples = _interleaved([sync(demo), sync(hidden)], SCOPE_LIST.scaled(quick))
        small = Result.from_sample(
            f"gate.List.scope.{path}",
            f"qmcp.List, N={n_demo} (the demo fleet): {path}",
            samples[0],
            qubes=n_demo,
        )
        big = Result.from_sample(
            f"gate.List.scope.{path}",
            f"qmcp.List, N={n_hidden}, same scope, {n_hidden - n_demo} hidden: {path}",
            samples[1],
            qubes=n_hidden,
        )
        if small.p50 and big.p50:
            ratio = big.p50 / small.p50
            big.extra["p50_ratio"] = round(ratio, 3)
            if path == "daemon":
                verdict = "within 2× ✓" if ratio <= 2 else "✗"
                big.notes = f"p50 ×{ratio:.2f} the demo's ({verdict})"
            else:  # the gate's part is the row above; the rest is the router's own read
                big.notes = f"p50 ×{ratio:.2f}: the router's own per-call host-wide read"
        small.notes = "interleaved with the next row"
        rows += [small, big]
    # what the qrexec router itself reads per call, as R4.3's qrexec-policy-exec does
    info = [_system_info(s) for s in (demo, hidden)]
    sizes = [len(fn()) for fn in info]
    samples = _interleaved(info, SCOPE_LIST.scaled(quick))
    for sample, n, size in zip(samples, (n_demo, n_hidden), sizes, strict=True):
        rows.append(
            Result.from_sample(
                "qubesd.SystemInfo",
                f"internal.GetSystemInfo, N={n}: what the router reads per qrexec call",
                sample,
                notes=f"reply {size:,} B; host-wide, paid by every qrexec call",
                qubes=n,
            )
        )
    trips = {}
    for kind in (stacks.DEMO, stacks.HIDDEN):
        trips[kind] = asyncio.run(_list_trips(load_config(stacks.stack(kind).config)))
    same = trips[stacks.DEMO] == trips[stacks.HIDDEN]
    rows.append(
        Result(
            "gate.trips.List.scope",
            f"qubesd round trips, one qmcp.List, N={n_demo} vs N={n_hidden} (same scope)",
            1,
            notes=f"{trips[stacks.DEMO]} vs {trips[stacks.HIDDEN]} "
            + ("(identical ✓)" if same else "(differ ✗)"),
            extra={"round_trips": trips},
        )
    )
    return rows


def _system_info(s: Stack) -> Callable[[], bytes]:
    request = b"internal.GetSystemInfo+ dom0 name dom0\0"

    def one() -> bytes:
        reply = unix_request(s.paths.qubesd_internal_sock, request)
        if not reply.startswith(b"0\0"):
            raise RuntimeError(f"internal.GetSystemInfo failed: {reply[:200]!r}")
        return reply

    return one


async def _list_trips(config: GateConfig) -> int:
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-bench-audit-") as tmp:
        audit = AuditLog(Path(tmp) / "audit.log", create=True)
        gate = Gate(config, audit, ConsentBroker(config.consent.timeout, None))
        await _count(gate, "List", None, b"")  # the first request also reconciles
        trips, _, _ = await _count(gate, "List", None, b"")
        audit.close()
    return trips


def run(quick: bool) -> list[Result]:
    return side_by_side(quick) + listing_scales_with_scope(quick) + round_trips()
