"""``qmcp.Run`` against ``qubes.VMShell`` on two versions of the code at once (issue 8).

``python -m bench.ab_gate_run --base REV [--rounds N]``: two demo stacks side by side, one
running the source tree of git revision ``REV`` (``git archive`` into a temporary directory,
first on ``PYTHONPATH`` of its subprocesses), one this working tree; then, round by round,
``qubes.VMShell true`` and ``qmcp.Run ["true"]`` into ``ai-dev`` on each, interleaved call by
call, so both versions meet the same load from whatever else runs on the machine. Prints p50
and p95 of each and the Run − VMShell gap per version. A measuring tool for before/after
comparisons, not a benchmark row (``machines.gate-run`` is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import stacks
from bench.common import REPO, percentile
from qubes_mcp.sim.qrexec.client import call
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient
from qubes_mcp.stack import PRINCIPAL, Stack, start_stack

TARGET = "ai-dev"
POLICY = f"qubes.VMShell * {PRINCIPAL} {TARGET} allow\n"


def _checkout(rev: str, into: Path) -> Path:
    """The ``src`` tree of ``rev``, extracted under ``into``."""
    archive = into / "src.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _start(root: Path, pythonpath: Path | None) -> Stack:
    saved = os.environ.get("PYTHONPATH")
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = str(pythonpath)
    try:
        return start_stack(root, config_edit=stacks._unlimited, timeout=300)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _calls(s: Stack) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    (s.paths.root / "etc/qubes/policy.d/20-ab.policy").write_text(POLICY)
    payload = json.dumps({"command": ["true"]}).encode()

    async def vmshell() -> None:
        done = await call(
            s.paths, source=PRINCIPAL, target=TARGET, service_and_arg="qubes.VMShell",
            stdin=b"true\n", timeout=60,
        )  # fmt: skip
        if done.exit_code != 0:
            raise RuntimeError(f"VMShell: {done.exit_code} {done.stderr!r}")

    async def run() -> None:
        done = await call(
            s.paths, source=PRINCIPAL, target=TARGET, service_and_arg="qmcp.Run",
            stdin=payload, timeout=60,
        )  # fmt: skip
        reply = json.loads(done.stdout or b"{}")
        if reply.get("ok") is not True or reply["result"]["exit_code"] != 0:
            raise RuntimeError(f"qmcp.Run: {reply}")

    return vmshell, run


def _ms(values: list[float], q: float) -> float:
    value = percentile(sorted(values), q)
    return 1000 * value if value is not None else float("nan")


async def _measure(
    rows: dict[str, Callable[[], Awaitable[None]]], rounds: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(rounds + 5):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            await fn()
            if i >= 5:  # warm-up
                times[name].append(time.perf_counter() - t0)
    return times


async def _main(base: str, rounds: int, tmp: Path) -> None:
    stacks_: dict[str, Stack] = {}
    try:
        stacks_[base] = _start(tmp / "base" / "root", _checkout(base, tmp))
        stacks_["worktree"] = _start(tmp / "new" / "root", None)
        rows = {}
        for label, s in stacks_.items():
            await QubesdClient(s.paths).start(TARGET)
            vmshell, run = _calls(s)
            rows[f"{label} VMShell"] = vmshell
            rows[f"{label} Run"] = run
        times = await _measure(rows, rounds)
    finally:
        for s in stacks_.values():
            s.stop()
    print(f"qmcp.Run vs qubes.VMShell `true` → {TARGET}, {rounds} interleaved rounds")
    for name, values in times.items():
        print(f"  {name:28} p50 {_ms(values, 0.5):7.2f} ms   p95 {_ms(values, 0.95):7.2f} ms")
    for label in stacks_:
        run, shell = times[f"{label} Run"], times[f"{label} VMShell"]
        gap50 = _ms(run, 0.5) - _ms(shell, 0.5)
        gap95 = _ms(run, 0.95) - _ms(shell, 0.95)
        print(f"  gap {label:24} p50 {gap50:+7.2f} ms   p95 {gap95:+7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qubes-mcp-ab-"))
    try:
        asyncio.run(_main(args.base, args.rounds, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
