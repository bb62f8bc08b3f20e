"""qrexec router (issue 2): one call through the emulated router, end to end.

The emulated dom0 is a real ``qubes-mcp sim run`` subprocess (the shared demo stack); this
process is the caller, connected to the router's control socket as the running qube
``mcp-control`` (what ``qrexec-client-vm`` in that qube does), via
``qubes_mcp.sim.qrexec.client.call``. Each call pays: request framing, a fresh
``internal.GetSystemInfo`` from qubesd, the policy (stat of every file, evaluation), the
dispatch, the streams and the exit code.

- ``router.dom0-exec``: ``bench.Echo``, a two-line ``/bin/sh`` executable installed in
  ``ROOT/etc/qubes-rpc`` (so: fork + exec on the host per call), allowed by a policy file;
- ``router.vmshell``: ``qubes.VMShell`` running ``true`` in the qube ``work``: the qube's
  agent runs ``/bin/sh`` in its long-lived sandbox (the first call, which also starts the
  qube and boots that sandbox, is shown apart; ``bench_machines`` has the per-call sandbox
  of before side by side);
- ``router.qvm-run``: the emulated dom0's ``ROOT/usr/bin/qvm-run ... work true`` as a
  subprocess: a fresh Python for the tool, then dom0's policy-free direct line. The gate no
  longer uses it (it runs ``qrexec-client``, see ``bench_machines``);
- ``router.denied``: a call an explicit ``deny`` rule refuses (exit 126): refusal latency.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

from bench import stacks
from bench.common import Budget, Result, bwrap_problem, measure_async, skipped
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec.client import CallResult, call

SOURCE = "mcp-control"
SHELL_TARGET = "work"
POLICY_NAME = "20-bench.policy"  # before the gate's 25-qubes-mcp.policy
POLICY = f"""\
bench.Echo * {SOURCE} @adminvm allow
bench.Denied * {SOURCE} @adminvm deny notify=no
qubes.VMShell * {SOURCE} {SHELL_TARGET} allow
"""
ECHO = "#!/bin/sh\n# qubes-mcp benchmark: echo the caller's stdin back\nexec cat\n"

EXEC_BUDGET = Budget(count=500, seconds=4.0, warmup=5)
SHELL_BUDGET = Budget(count=200, seconds=6.0, warmup=3)
QVM_RUN_BUDGET = Budget(count=40, seconds=6.0, warmup=2)
DENY_BUDGET = Budget(count=1000, seconds=3.0, warmup=5)


def install(paths: SimPaths) -> None:
    """The benchmark's dom0 service and policy file (the router reloads the policy itself)."""
    service = paths.rpc_dir / "bench.Echo"
    service.parent.mkdir(parents=True, exist_ok=True)
    service.write_text(ECHO)
    service.chmod(0o755)
    policy_dir = paths.root / "etc" / "qubes" / "policy.d"
    (policy_dir / POLICY_NAME).write_text(POLICY)


async def _call(paths: SimPaths, target: str, service: str, stdin: bytes) -> CallResult:
    return await call(
        paths, source=SOURCE, target=target, service_and_arg=service, stdin=stdin, timeout=120
    )


async def _expect(paths: SimPaths, target: str, service: str, stdin: bytes, code: int) -> bytes:
    result = await _call(paths, target, service, stdin)
    if result.exit_code != code:
        raise RuntimeError(
            f"{service} on {target}: exit {result.exit_code}, expected {code}: {result.stderr!r}"
        )
    return result.stdout


async def _run(quick: bool) -> list[Result]:
    paths = stacks.stack(stacks.DEMO).paths
    install(paths)
    results = []

    async def echo() -> None:
        if await _expect(paths, "@adminvm", "bench.Echo", b"ping\n", 0) != b"ping\n":
            raise RuntimeError("bench.Echo did not echo")

    results.append(
        Result.from_sample(
            "router.dom0-exec",
            f"bench.Echo {SOURCE} → @adminvm: /bin/sh executable in ROOT/etc/qubes-rpc",
            await measure_async(echo, EXEC_BUDGET.scaled(quick)),
            notes="allow; fork+exec per call",
        )
    )

    why = bwrap_problem()
    if why is not None:
        results.append(skipped("router.vmshell", f"qubes.VMShell `true` in {SHELL_TARGET}", why))
    else:

        async def shell() -> None:
            await _expect(paths, SHELL_TARGET, "qubes.VMShell", b"true\n", 0)

        t0 = time.perf_counter()
        await shell()  # starts the qube (admin.vm.Start) and makes its first sandbox
        cold = time.perf_counter() - t0
        results.append(
            Result(
                "router.vmshell-cold",
                f"qubes.VMShell `true` in {SHELL_TARGET}, qube halted before",
                1,
                p50=cold,
                p99=cold,
                mean=cold,
                notes="first call: autostart boots the sandbox + agent",
            )
        )
        results.append(
            Result.from_sample(
                "router.vmshell",
                f"qubes.VMShell `true` in {SHELL_TARGET} (running): its long-lived sandbox",
                await measure_async(shell, SHELL_BUDGET.scaled(quick)),
                notes="allow; the agent forks /bin/sh in the qube",
            )
        )
        qvm_run = paths.root / "usr" / "bin" / "qvm-run"
        argv = [str(qvm_run), "--pass-io", "--no-gui", "--user", "root", "--no-shell"]
        argv += ["--", SHELL_TARGET, "true"]

        async def dom0_qvm_run() -> None:
            done = await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, timeout=120, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"qvm-run failed: {done.stderr!r}")

        results.append(
            Result.from_sample(
                "router.qvm-run",
                f"dom0 `qvm-run --pass-io --no-shell {SHELL_TARGET} true` (shim subprocess)",
                await measure_async(dom0_qvm_run, QVM_RUN_BUDGET.scaled(quick)),
                notes="no policy (dom0 direct line); a full python per call",
            )
        )

    async def denied() -> None:
        await _expect(paths, "@adminvm", "bench.Denied", b"", 126)

    results.append(
        Result.from_sample(
            "router.denied",
            f"bench.Denied {SOURCE} → @adminvm, refused by a deny rule",
            await measure_async(denied, DENY_BUDGET.scaled(quick)),
            notes="exit 126 `Request refused`",
        )
    )
    return results


def run(quick: bool) -> list[Result]:
    return asyncio.run(_run(quick))
