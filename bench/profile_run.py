"""Where one ``qmcp.Run ["true"]`` spends its time inside the gate (issue 8 §1's last goal).

``python -m bench.profile_run [--n N]``: an in-process ``Gate`` on the shared demo stack's
configuration (its qubesd, its emulated qubes, its compiled ``qrexec-client``; an audit log of
its own in a temporary directory on the same file system), ``ai-dev`` started first, then
``N`` Runs, each phase timed by wrapping the function that does it. Prints the median of each
phase per request and the qubesd calls one Run makes. Not a benchmark row: the wrappers cost
a little themselves; ``machines.gate-run`` is the number that counts.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import stacks
from qubes_mcp.dom0 import gate as gate_mod
from qubes_mcp.dom0 import handlers_write, relay
from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit import files as audit_files
from qubes_mcp.dom0.audit import log as audit_log
from qubes_mcp.dom0.config import load_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.reader import FleetReader
from qubes_mcp.stack import PRINCIPAL

TARGET = "ai-dev"
#: phase → seconds spent in it during the current request (summed over calls)
_spent: dict[str, float] = defaultdict(float)
_calls: list[str] = []


def _timed_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            _spent[name] += time.perf_counter() - t0

    return wrapper


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[name] += time.perf_counter() - t0

    return wrapper


def _instrument() -> None:
    gate_mod.check_payload = _timed("parse (check_payload)", gate_mod.check_payload)
    gate_mod.decide = _timed("decide", gate_mod.decide)
    FleetReader.facts = _timed_async("facts (reader.facts)", FleetReader.facts)  # type: ignore[method-assign]
    gate_mod.Gate._append = _timed_async("audit (_append, thread hop incl.)", gate_mod.Gate._append)  # type: ignore[method-assign]
    audit_log.AuditLog.append = _timed("  audit append (in thread)", audit_log.AuditLog.append)  # type: ignore[method-assign]
    audit_log.os.fsync = _timed("    fsync (log line + anchor + dir)", os.fsync)  # type: ignore[attr-defined]
    audit_log.os.fdatasync = _timed("    fdatasync", os.fdatasync)  # type: ignore[attr-defined]
    audit_files.os.replace = _timed("    anchor rename", os.replace)  # type: ignore[attr-defined]
    original_call = AdminClient.call

    async def call(self: AdminClient, dest: str, method: str, *a: Any, **k: Any) -> str:
        _calls.append(f"{method} {dest}")
        t0 = time.perf_counter()
        try:
            return await original_call(self, dest, method, *a, **k)
        finally:
            _spent["  qubesd calls (all)"] += time.perf_counter() - t0

    AdminClient.call = call  # type: ignore[method-assign]
    spawn = relay.asyncio.create_subprocess_exec
    relay.asyncio.create_subprocess_exec = _timed_async("  relay spawn", spawn)  # type: ignore[attr-defined]
    handlers_write.run_command = _timed_async("relay (run_command)", handlers_write.run_command)


async def _main(n: int) -> None:
    s = stacks.stack(stacks.DEMO)
    config = load_config(s.config)
    _instrument()
    payload = json.dumps({"command": ["true"]}).encode()
    totals: list[float] = []
    per_phase: dict[str, list[float]] = defaultdict(list)
    calls: list[str] = []
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-profile-") as tmp:
        audit = audit_log.AuditLog(Path(tmp) / "audit.log", create=True)
        gate = gate_mod.Gate(config, audit, ConsentBroker(config.consent.timeout, None))
        await gate.admin.call(TARGET, "admin.vm.Start")
        for i in range(n + 5):
            _spent.clear()
            _calls.clear()
            t0 = time.perf_counter()
            reply = await gate.handle(gate_mod.Request("qmcp.Run", PRINCIPAL, TARGET, payload))
            total = time.perf_counter() - t0
            if reply.get("ok") is not True:
                raise SystemExit(f"qmcp.Run refused: {reply}")
            if i < 5:  # warm-up (the first request also reconciles the registry)
                continue
            totals.append(total)
            for name, spent in _spent.items():
                per_phase[name].append(spent)
            calls = list(_calls)
        audit.close()
    med = statistics.median
    print(f"qmcp.Run ['true'] → {TARGET}, in-process Gate.handle, median of {n}:")
    print(f"  {'total (Gate.handle)':40} {1000 * med(totals):7.2f} ms")
    for name in sorted(per_phase, key=lambda k: -med(per_phase[k])):
        print(f"  {name:40} {1000 * med(per_phase[name]):7.2f} ms")
    accounted = sum(
        med(per_phase[k]) for k in per_phase if not k.startswith(" ") and k in per_phase
    )
    print(f"  {'(rest: pipeline, handler, reply)':40} {1000 * (med(totals) - accounted):7.2f} ms")
    print(f"  qubesd calls per Run: {len(calls)}: {', '.join(calls)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    try:
        asyncio.run(_main(args.n))
    finally:
        stacks.close_all()


if __name__ == "__main__":
    main()
