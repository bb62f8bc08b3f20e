"""Emulated qubes as long-lived sandboxes (issue 8 §1): a command into a running qube, the
gate's ``qmcp.Run`` into the same qube, and today's per-call sandbox, side by side.

All on the shared demo stack, into ``ai-dev`` (running; the gate's Run target):

- ``machines.vmshell``: ``qubes.VMShell`` ``true`` from ``mcp-control`` through the router
  (allowed by a bench policy file): policy, then the qube's agent runs ``/bin/sh`` in the
  qube's one sandbox (goal p50 ≤ 15 ms);
- ``machines.vmshell-percall``: the same service in a fresh bubblewrap sandbox per call
  (``QubeSandbox.run_service``, what every call cost before: no router in this row, which adds
  about ``router.denied``);
- ``machines.qrexec-client``: dom0's ``qrexec-client -d ai-dev root:QUBESRPC qubes.VMExec+true
  dom0`` as a subprocess (what the gate runs per ``qmcp.Run``, minus the gate);
- ``machines.relay``: the gate's relay alone (``dom0.relay.run_command``, in process):
  ``qrexec-client`` with the command under ``timeout`` and the run marker in the qube;
- ``machines.gate-run``: ``qmcp.Run ["true"]`` on ``ai-dev`` through the router from
  ``mcp-control`` (what the MCP server waits for); its note gives the distance to
  ``machines.vmshell`` (goal ≤ 15 ms);
- ``machines.cold-start``: ``qubes.VMShell`` ``true`` into ``ai-web`` halted before (autostart
  boots its sandbox; goal ≤ 300 ms), killed again after each sample.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

from bench import stacks
from bench.common import (
    Budget,
    Result,
    Sample,
    bwrap_problem,
    measure_async,
    percentile,
    skipped,
)
from qubes_mcp.dom0 import relay
from qubes_mcp.sim.qrexec.client import call
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient
from qubes_mcp.sim.sandbox import QubeSandbox
from qubes_mcp.stack import PRINCIPAL

TARGET = "ai-dev"
COLD = "ai-web"
POLICY_NAME = "20-bench-machines.policy"
POLICY = f"""\
qubes.VMShell * {PRINCIPAL} {TARGET} allow
qubes.VMShell * {PRINCIPAL} {COLD} allow
"""
WARM = Budget(count=300, seconds=6.0, warmup=5)
PERCALL = Budget(count=60, seconds=6.0, warmup=2)
RUN = Budget(count=150, seconds=6.0, warmup=3)
COLD_N = 8


async def _rows(quick: bool) -> list[Result]:
    s = stacks.stack(stacks.DEMO)
    paths = s.paths
    (paths.root / "etc/qubes/policy.d" / POLICY_NAME).write_text(POLICY)
    qubesd = QubesdClient(paths)
    await qubesd.start(TARGET)
    rows: list[Result] = []

    async def vmshell(target: str = TARGET) -> None:
        result = await call(
            paths,
            source=PRINCIPAL,
            target=target,
            service_and_arg="qubes.VMShell",
            stdin=b"true\n",
            timeout=60,
        )
        if result.exit_code != 0:
            raise RuntimeError(f"VMShell into {target}: {result.exit_code} {result.stderr!r}")

    warm_sample = await measure_async(vmshell, WARM.scaled(quick))
    warm = Result.from_sample(
        "machines.vmshell",
        f"qubes.VMShell `true` {PRINCIPAL} → {TARGET} (running): the qube's one sandbox",
        warm_sample,
        notes="router + policy + agent in the long-lived sandbox; goal p50 ≤ 15 ms",
        p95_ms=_p95_ms(warm_sample),
    )
    rows.append(warm)

    sandbox = QubeSandbox(paths, TARGET)

    async def percall() -> None:
        result = await sandbox.run_service("qubes.VMShell", source=PRINCIPAL, stdin=b"true\n")
        if result.exit_code != 0:
            raise RuntimeError(f"per-call sandbox: {result}")

    rows.append(
        Result.from_sample(
            "machines.vmshell-percall",
            f"qubes.VMShell `true` in {TARGET}: a new bwrap sandbox per call (before)",
            await measure_async(percall, PERCALL.scaled(quick)),
            notes="the sandbox alone, no router (+ about router.denied)",
        )
    )

    client = paths.root / "usr/lib/qubes/qrexec-client"
    argv = [str(client), "-d", TARGET, "root:QUBESRPC qubes.VMExec+true dom0"]

    async def direct() -> None:
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"qrexec-client: {done.returncode} {done.stderr!r}")

    rows.append(
        Result.from_sample(
            "machines.qrexec-client",
            f"dom0 `qrexec-client -d {TARGET} root:QUBESRPC qubes.VMExec+true dom0`",
            await measure_async(direct, RUN.scaled(quick)),
            notes="the gate's line per Run (compiled where cc exists), no policy",
        )
    )

    async def relay_only() -> None:
        result = await relay.run_command(
            client, TARGET, ["true"], stdin=b"", timeout=600, limit=4096
        )
        if result.exit_code != 0:
            raise RuntimeError(f"relay: {result}")

    rows.append(
        Result.from_sample(
            "machines.relay",
            f"dom0.relay.run_command(['true']) → {TARGET}, in process (the gate's relay alone)",
            await measure_async(relay_only, RUN.scaled(quick)),
            notes="qrexec-client + env/timeout in the qube",
        )
    )

    payload = json.dumps({"command": ["true"]}).encode()

    async def gate_run() -> None:
        result = await call(
            paths,
            source=PRINCIPAL,
            target=TARGET,
            service_and_arg="qmcp.Run",
            stdin=payload,
            timeout=60,
        )
        reply = json.loads(result.stdout or b"{}")
        if reply.get("ok") is not True or reply["result"]["exit_code"] != 0:
            raise RuntimeError(f"qmcp.Run: {reply}")

    run_sample = await measure_async(gate_run, RUN.scaled(quick))
    run = Result.from_sample(
        "machines.gate-run",
        f'qmcp.Run ["true"] → {TARGET} via the router from {PRINCIPAL}',
        run_sample,
        p95_ms=_p95_ms(run_sample),
    )
    if run.p50 is not None and warm.p50 is not None:
        gap95 = run.extra["p95_ms"] - warm.extra["p95_ms"]
        run.notes = (
            f"vs machines.vmshell: p50 {1000 * (run.p50 - warm.p50):+.1f} ms, "
            f"p95 {gap95:+.1f} ms; goal ≤ 15"
        )
    rows.append(run)

    samples = []
    began = time.perf_counter()
    for _ in range(max(2, COLD_N // (4 if quick else 1))):
        if await _running(qubesd, COLD):
            await qubesd.kill(COLD)
        t0 = time.perf_counter()
        await vmshell(COLD)
        samples.append(time.perf_counter() - t0)
    wall = time.perf_counter() - began
    await qubesd.kill(COLD)
    rows.append(
        Result.from_sample(
            "machines.cold-start",
            f"qubes.VMShell `true` {PRINCIPAL} → {COLD}, halted before (autostart)",
            Sample(samples, wall),
            notes="admin.vm.Start boots the sandbox + agent; goal ≤ 300 ms",
        )
    )
    return rows


def _p95_ms(sample: Sample) -> float:
    """The sample's 95th percentile (nearest rank) in ms: the gap's tail, for the note."""
    value = percentile(sorted(sample.latencies), 0.95)
    return round(1000 * value, 3) if value is not None else float("nan")


async def _running(qubesd: QubesdClient, name: str) -> bool:
    info = await qubesd.system_info()
    return bool(info["domains"][name]["power_state"] == "Running")


def run(quick: bool) -> list[Result]:
    why = bwrap_problem()
    if why is not None:
        return [skipped("machines", "long-lived qube sandboxes", why)]
    return asyncio.run(_rows(quick))
