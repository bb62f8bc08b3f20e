"""Promise 1 below the reply bytes: a missing qube and an out-of-scope qube cost the gate the
same qubesd round trips, in the same order, and no measurable difference in time.

The gate runs in-process here (its real code, a real emulated qubesd on a socket), so the
round trips can be counted exactly; the timing check compares medians over many alternating
calls and allows generous noise, since the shared 2-core CI machine is busy.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.gate import Gate, Request
from tests.enrolment_helpers import migrate_tagged
from tests.gate_fixtures import CONFIG_TEXT
from tests.qubesd_fixtures import Qubesd

HIDDEN = ["vault", "sys-net", "debian-13-xfce", "ai-dump-not-here", "no-such-qube", "zz-nope"]


def _gate(qubesd: Qubesd, tmp_path: Path) -> Gate:
    # no rate limit: these tests measure the decision path, not the limiter's refusal
    unlimited = "\n[limits]\nrate = 100000\nburst = 100000\n"
    unlimited += "refused_rate = 100000\nrefused_burst = 100000\n"
    config = parse_config(
        CONFIG_TEXT + unlimited + f'\n[paths]\nqubesd_socket = "{qubesd.paths.qubesd_sock}"\n'
        f'state_dir = "{tmp_path}/state"\npolicy_dir = "{tmp_path}/policy.d"\n'
    )
    migrate_tagged(config)  # the demo fleet's tagged qubes, enrolled by name as install does
    audit = AuditLog(tmp_path / "audit" / "audit.log")
    gate = Gate(config, audit, ConsentBroker(5), AdminClient(qubesd.paths.qubesd_sock))
    # the once-per-process reconcile happens before the first decision; not what is measured
    asyncio.run(gate.handle(Request("qmcp.List", "mcp-control", None, b"")))
    return gate


def _copy_to(gate: Gate, destination: str) -> tuple[bytes, int, float]:
    payload = json.dumps({"destination": destination, "paths": ["/etc/hostname"]}).encode()
    before = gate.admin.round_trips
    started = time.perf_counter()
    reply = asyncio.run(gate.handle(Request("qmcp.Copy", "mcp-control", "ai-dev", payload)))
    elapsed = time.perf_counter() - started
    return json.dumps(reply).encode(), gate.admin.round_trips - before, elapsed


@pytest.mark.parametrize("hidden", HIDDEN)
def test_same_bytes_and_same_round_trips_for_missing_and_out_of_scope(
    qubesd: Qubesd, tmp_path: Path, hidden: str
) -> None:
    gate = _gate(qubesd, tmp_path)
    reply_missing, trips_missing, _ = _copy_to(gate, "no-such-qube")
    reply_hidden, trips_hidden, _ = _copy_to(gate, hidden)
    assert reply_hidden == reply_missing
    assert trips_hidden == trips_missing


def _info(gate: Gate, qube: str) -> float:
    started = time.perf_counter()
    reply = asyncio.run(gate.handle(Request("qmcp.Info", "mcp-control", qube, b"")))
    elapsed = time.perf_counter() - started
    assert reply["ok"] is False and reply["error"]["code"] == "not-found", reply
    return elapsed


def test_no_measurable_timing_difference(qubesd: Qubesd, tmp_path: Path) -> None:
    """A read refusal writes no audit line, so the time is the decision path itself; one
    extra qubesd round trip for either kind would show as a large relative difference."""
    gate = _gate(qubesd, tmp_path)
    for _ in range(20):  # warm up both paths
        _info(gate, "vault")
        _info(gate, "no-such-qube")
    hidden, missing = [], []
    for _ in range(300):
        hidden.append(_info(gate, "vault"))
        missing.append(_info(gate, "no-such-qube"))
    m_hidden, m_missing = statistics.median(hidden), statistics.median(missing)
    assert abs(m_hidden - m_missing) < 0.2 * min(m_hidden, m_missing), (m_hidden, m_missing)


def _link_to(gate: Gate, server: str, op: str = "qmcp.LinkOpen") -> tuple[bytes, int]:
    payload = json.dumps({"server": server, "port": 8080}).encode()
    before = gate.admin.round_trips
    reply = asyncio.run(gate.handle(Request(op, "mcp-control", "ai-web", payload)))
    return json.dumps(reply).encode(), gate.admin.round_trips - before


@pytest.mark.parametrize("op", ["qmcp.LinkOpen", "qmcp.LinkClose"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_a_link_to_a_hidden_server_costs_what_a_missing_one_does(
    qubesd: Qubesd, tmp_path: Path, hidden: str, op: str
) -> None:
    """Lab links (decision 0018): the server named in the payload is read like any reference,
    so a hidden server and a missing one get the same bytes after the same round trips, and
    nothing is asked of the operator for either."""
    gate = _gate(qubesd, tmp_path)
    reply_missing, trips_missing = _link_to(gate, "no-such-qube", op)
    reply_hidden, trips_hidden = _link_to(gate, hidden, op)
    assert reply_hidden == reply_missing
    assert json.loads(reply_missing)["error"]["code"] == "not-found"
    assert trips_hidden == trips_missing
    assert gate.consent.pending() == []
