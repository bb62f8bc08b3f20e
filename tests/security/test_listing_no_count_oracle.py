"""Promise 1 in the time of listing (issue 7 §5): nothing a principal asks costs more, takes
longer, or calls qubesd differently because the operator has more qubes it cannot see.

Two emulated dom0s side by side: the demo fleet, and the same fleet after the operator added
500 unrelated qubes (plain AppVMs, names inside the principal's prefix, and qubes that carry
copied scope and tier tags without being enrolled: what an operator's disposable or clone of an
enrolled qube looks like). Each has its own in-process gate (the real code, real qubesd
protocol on a socket). For ``qmcp.List``, ``qmcp.Budget``, a create refused for its budget, and
the same create naming one of the hidden qubes, we check:

- deterministically: the same reply bytes and the very same sequence of qubesd calls
  (destination, method, argument) with, for requests that name no hidden qube, the same reply
  sizes -- a host-wide read (``admin.vm.List`` on dom0, a walk of every qube's tags) differs in
  count or in size;
- statistically: the latency distributions do not differ, by a two-sample Kolmogorov-Smirnov
  test at alpha = 0.001. The two fleets' calls are interleaved (in a shuffled order within
  each pair) so that the load of the shared machine falls on both alike.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.gate import Gate, Request
from qubes_mcp.sim.fleet import demo_fleet_text, load_fleet
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import persist
from tests.enrolment_helpers import in_process_config
from tests.qubesd_fixtures import Qubesd

EXTRA = 500
PRINCIPAL = "mcp-control"
#: a hidden qube inside the principal's prefix, present only in the big fleet
HIDDEN_IN_PREFIX = "ai-op-0003"
UNLIMITED = (
    "\n[limits]\nrate = 100000\nburst = 100000\nrefused_rate = 100000\nrefused_burst = 100000\n"
)
#: (label, service, target, payload, refusal code or None, names a hidden qube)
Spec = tuple[str, str, str | None, dict[str, object], str | None, bool]
REQUESTS: tuple[Spec, ...] = (
    ("list", "qmcp.List", None, {}, None, False),
    ("budget", "qmcp.Budget", None, {}, None, False),
    (
        "create-refused",
        "qmcp.Create",
        "ai-debian",
        {"name": "ai-brand-new", "private_size": 5 << 30},
        "budget-exceeded",
        False,
    ),
    (
        "create-hidden-name",
        "qmcp.Create",
        "ai-debian",
        {"name": HIDDEN_IN_PREFIX, "private_size": 5 << 30},
        "budget-exceeded",
        True,
    ),
)
TIMED = ("list", "budget", "create-refused")
SAMPLES = 300
ALPHA = 0.001


def _extra(i: int) -> tuple[str, tuple[str, ...]]:
    """The i-th qube the operator adds, and the tags it gets: a plain AppVM, one inside the
    principal's prefix, and copies of an enrolled qube's scope and tier tags (a disposable or
    a clone of an enrolled qube looks like that, decision record 0010)."""
    kind = i % 4
    name = f"ai-op-{i:04d}" if kind == 3 else f"op-{i:04d}"
    tags = {1: ("ai-managed", "ai-exec"), 2: ("ai-managed",)}.get(kind, ())
    return name, tags


def extra_qubes_text(count: int = EXTRA) -> str:
    return "".join(
        f'\n[[qube]]\nname = "{_extra(i)[0]}"\nclass = "AppVM"\nlabel = "gray"\n'
        for i in range(count)
    )


def _tag_extras(qubesd: Qubesd, count: int = EXTRA) -> None:
    """What the operator does after install (``qvm-tags NAME add ...``), applied on qubesd's
    own loop and saved once (through the Admin API each tag is a durable save of the whole
    fleet: 20 s for these 250)."""

    def apply() -> None:
        app = qubesd.app
        for i in range(count):
            name, tags = _extra(i)
            for tag in tags:
                app.add_tag(app.domains[name], tag)
        persist.save(app)

    qubesd.on_loop(apply)


class RecordingAdmin(AdminClient):
    """The gate's qubesd client, noting each call and the size of its reply."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path)
        self.calls: list[tuple[str, str, str, int]] = []

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        try:
            reply = await super().call(dest, method, arg, payload)
        except Exception:
            self.calls.append((dest, method, arg, -1))
            raise
        self.calls.append((dest, method, arg, len(reply)))
        return reply


@dataclass
class Fleet:
    qubesd: Qubesd
    gate: Gate
    admin: RecordingAdmin
    times: dict[str, list[float]] = field(default_factory=dict)


def _fleet(root: Path, extra: str) -> Fleet:
    fleet_file = root / "fleet.toml"
    root.mkdir(parents=True)
    fleet_file.write_text(demo_fleet_text() + extra)
    qubesd = Qubesd(load_fleet(fleet_file, SimPaths(root / "root"))).start()
    config = in_process_config(qubesd.paths.qubesd_sock, root, UNLIMITED)
    if extra:  # after install: the operator's later qubes are not migrated into the scope
        _tag_extras(qubesd)
    admin = RecordingAdmin(qubesd.paths.qubesd_sock)
    gate = Gate(config, AuditLog(root / "audit" / "audit.log"), ConsentBroker(5), admin)
    return Fleet(qubesd, gate, admin)


@pytest.fixture(scope="module")
def fleets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Fleet]]:
    base = tmp_path_factory.mktemp("count-oracle")
    small = _fleet(base / "small", "")
    big = _fleet(base / "big", extra_qubes_text())
    try:
        yield small, big
    finally:
        small.qubesd.stop()
        big.qubesd.stop()


async def _one(fleet: Fleet, label: str) -> tuple[dict[str, object], list[tuple[str, ...]], float]:
    _, service, target, payload, _, _ = next(r for r in REQUESTS if r[0] == label)
    body = json.dumps(payload).encode() if payload else b""
    start = len(fleet.admin.calls)
    started = time.perf_counter()
    reply = await fleet.gate.handle(Request(service, PRINCIPAL, target, body))
    elapsed = time.perf_counter() - started
    return reply, [tuple(map(str, c)) for c in fleet.admin.calls[start:]], elapsed


def _without_sizes(calls: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [c[:3] for c in calls]


def test_the_big_fleet_really_has_the_hidden_qubes(fleets: tuple[Fleet, Fleet]) -> None:
    small, big = fleets
    counts = []
    for fleet in fleets:
        listed = asyncio.run(fleet.admin.lines("dom0", "admin.vm.List"))
        counts.append(len(listed))
    assert counts[1] == counts[0] + EXTRA
    assert small.admin.calls[-1][:2] == big.admin.calls[-1][:2] == ("dom0", "admin.vm.List")
    copied = asyncio.run(big.admin.lines(_extra(1)[0], "admin.vm.tag.List"))
    assert {"ai-managed", "ai-exec"} <= set(copied)  # copied tags, and yet not in scope:
    assert big.gate.registry.current().entry("ai", _extra(1)[0]) is None


@pytest.mark.parametrize("label", [r[0] for r in REQUESTS])
def test_same_reply_and_same_qubesd_calls(fleets: tuple[Fleet, Fleet], label: str) -> None:
    """Deterministic: identical replies, identical qubesd call sequences (and, unless the
    request names a hidden qube, identical reply sizes). This is what catches a host-wide
    read even when the machine is too noisy for the timing test."""
    small, big = fleets
    expected = next(r for r in REQUESTS if r[0] == label)
    got = []
    for fleet in (small, big):
        asyncio.run(_one(fleet, label))  # the first request of a gate also reconciles
        got.append(asyncio.run(_one(fleet, label)))
    (reply_s, calls_s, _), (reply_b, calls_b, _) = got
    assert reply_s == reply_b
    code = expected[4]
    if code is None:
        assert reply_s["ok"] is True, reply_s
    else:
        assert reply_s["ok"] is False and reply_s["error"]["code"] == code, reply_s  # type: ignore[index]
    assert len(calls_s) == len(calls_b), (calls_s, calls_b)
    assert _without_sizes(calls_s) == _without_sizes(calls_b)
    if not expected[5]:
        assert calls_s == calls_b
    assert not any(c[0] == "dom0" and c[1] == "admin.vm.List" for c in calls_b), calls_b


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    xs, ys = sorted(a), sorted(b)
    i = j = 0
    gap = 0.0
    while i < len(xs) and j < len(ys):
        value = min(xs[i], ys[j])
        while i < len(xs) and xs[i] <= value:
            i += 1
        while j < len(ys) and ys[j] <= value:
            j += 1
        gap = max(gap, abs(i / len(xs) - j / len(ys)))
    return gap


def ks_critical(n: int, m: int, alpha: float = ALPHA) -> float:
    """The asymptotic critical value of D: c(alpha) * sqrt((n + m) / (n * m))."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def test_ks_statistic_itself() -> None:
    same = [float(i) for i in range(100)]
    assert ks_statistic(same, same) == 0.0
    assert ks_statistic(same, [x + 1000 for x in same]) == 1.0
    assert ks_statistic([1.0, 2.0], [1.5, 2.5]) == 0.5
    assert 0.15 < ks_critical(300, 300) < 0.17  # c(0.001) = 1.949


async def _measure(small: Fleet, big: Fleet) -> None:
    rng = random.Random(7)
    for fleet in (small, big):
        fleet.times = {label: [] for label in TIMED}
        for _ in range(10):  # warm up (reconcile, caches, the audit file)
            for label in TIMED:
                await _one(fleet, label)
    for _ in range(SAMPLES):
        for label in TIMED:
            pair = [small, big]
            rng.shuffle(pair)
            for fleet in pair:
                fleet.times[label].append((await _one(fleet, label))[2])
    for fleet in (small, big):
        watcher = fleet.gate._watcher
        if watcher is not None:
            watcher.cancel()


def test_no_latency_difference_with_500_hidden_qubes(fleets: tuple[Fleet, Fleet]) -> None:
    small, big = fleets
    asyncio.run(_measure(small, big))
    critical = ks_critical(SAMPLES, SAMPLES)
    report = {}
    for label in TIMED:
        d = ks_statistic(small.times[label], big.times[label])
        medians = [sorted(f.times[label])[SAMPLES // 2] * 1000 for f in (small, big)]
        report[label] = (round(d, 3), [round(m, 2) for m in medians])
    print(f"KS D (critical {critical:.3f}) and medians in ms, demo vs +{EXTRA}: {report}")
    assert all(d < critical for d, _ in report.values()), (f"D_crit={critical:.3f}", report)


def test_the_act_on_a_hidden_name_fails_closed_and_leaves_the_qube(
    fleets: tuple[Fleet, Fleet],
) -> None:
    """The one place a hidden name can show: the create itself. qubesd refuses the duplicate;
    the agent gets a fixed refusal without qubesd's text, and the operator's qube is left
    exactly as it was (never "rolled back", never tagged, never registered)."""
    _, big = fleets
    before = asyncio.run(big.admin.lines(HIDDEN_IN_PREFIX, "admin.vm.tag.List"))
    body = json.dumps({"name": HIDDEN_IN_PREFIX}).encode()
    reply = asyncio.run(big.gate.handle(Request("qmcp.Create", PRINCIPAL, "ai-debian", body)))
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert error["code"] in ("failed", "conflict"), reply
    assert HIDDEN_IN_PREFIX not in error["message"] and "exists" not in error["message"]
    assert asyncio.run(big.admin.lines(HIDDEN_IN_PREFIX, "admin.vm.tag.List")) == before
    listed = asyncio.run(big.gate.handle(Request("qmcp.List", PRINCIPAL, None, b"")))
    assert HIDDEN_IN_PREFIX not in json.dumps(listed)


def test_events_of_hidden_qubes_cost_no_qubesd_read_and_show_nothing(
    fleets: tuple[Fleet, Fleet],
) -> None:
    """``events.watch`` sees the whole host's stream; an event about a qube that is not
    registered (even one given the scope's tags, as a copy would carry) must cost the gate no
    qubesd read and show nothing."""
    _, big = fleets
    operator = AdminClient(big.qubesd.paths.qubesd_sock)
    touched = [_extra(i)[0] for i in range(0, 80, 4)]  # plain hidden qubes

    async def scenario() -> tuple[dict[str, object], list[tuple[str, str, str, int]]]:
        start = len(big.admin.calls)
        body = json.dumps({"seconds": 4}).encode()
        watch = asyncio.create_task(big.gate.handle(Request("qmcp.Events", PRINCIPAL, None, body)))
        label = (await operator.call("ai-notes", "admin.vm.property.Get", "label")).split()[-1]
        await asyncio.sleep(0.5)
        for name in touched:
            await operator.call(name, "admin.vm.tag.Set", "ai-managed")
            await operator.call(name, "admin.vm.property.Set", "label", b"red")
        # last, and well inside the window: proves the watch saw the stream all along
        await operator.call("ai-notes", "admin.vm.property.Set", "label", b"red")
        reply = await watch
        for name in touched:
            await operator.call(name, "admin.vm.tag.Remove", "ai-managed")
            await operator.call(name, "admin.vm.property.Set", "label", b"gray")
        await operator.call("ai-notes", "admin.vm.property.Set", "label", label.encode())
        return reply, big.admin.calls[start:]

    reply, calls = asyncio.run(scenario())
    assert reply["ok"] is True, reply
    text = json.dumps(reply)
    assert not any(name in text for name in touched)
    assert "ai-notes" in text  # the watch did see the stream while the operator worked
    assert not any(c[0] in touched for c in calls), calls
