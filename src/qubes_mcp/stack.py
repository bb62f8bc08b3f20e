"""The whole thing on one machine: an emulated dom0 with the gate installed and running.

Used by ``qubes-mcp demo``, the end-to-end tests and the benchmarks. Every part runs as
it would for a user: ``qubes-mcp sim run`` and ``qubes-mcp-admin gate`` are subprocesses,
and the gate is installed with ``qubes-mcp-admin install --root``, so what is exercised here
is exactly what the README tells people to run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths

PRINCIPAL = "mcp-control"
EGRESS = "ai-egress"


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"{proc.args!r} did not become ready:\n{text[-4000:]}")
        time.sleep(0.05)


def sim_call(
    root: Path,
    source: str,
    target: str,
    service: str,
    payload: bytes = b"",
    *,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """``qubes-mcp sim call`` exactly as a user or a script runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "qubes_mcp.cli",
            "sim",
            "call",
            "--root",
            str(root),
            "--from",
            source,
            target,
            service,
        ],
        input=payload,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def start_emulator(
    root: Path, fleet: Path | None = None, *, timeout: float = 60
) -> subprocess.Popen[bytes]:
    """``qubes-mcp sim run`` in the background, once it has written its ready file."""
    argv = [sys.executable, "-m", "qubes_mcp.cli", "sim", "run", "--root", str(root)]
    if fleet is not None:
        argv += ["--fleet", str(fleet)]
    log = root.parent / f"{root.name}.emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
    _wait_for(root / "run" / "emulator.ready", proc, log, timeout)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not go within 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Stack:
    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def paths(self) -> SimPaths:
        return SimPaths(self.root)

    @property
    def config(self) -> Path:
        return self.root / "etc/qubes-mcp/config.toml"

    def admin(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``qubes-mcp-admin ARGS --config ROOT/...`` (operator commands)."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "qubes_mcp.dom0.operator.cli",
                *args,
                "--config",
                str(self.config),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def call(
        self,
        target: str,
        service: str,
        payload: bytes = b"",
        *,
        source: str = PRINCIPAL,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[bytes]:
        """``qubes-mcp sim call`` as the principal (or any qube)."""
        return sim_call(self.root, source, target, service, payload, timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


def start_stack(
    root: Path,
    *,
    fleet: Path | None = None,
    config_edit: Callable[[str], str] | None = None,
    timeout: float = 60,
) -> Stack:
    """Start the emulator, install the gate into its root, start the gate.

    ``config_edit`` may rewrite the configuration ``install`` would write (tests use it for
    small budgets, guarded qubes, consent lists).
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    stack = Stack(root)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_dir = root.parent
    try:
        stack.procs.append(start_emulator(root, fleet, timeout=timeout))
        if config_edit is not None:
            from qubes_mcp.dom0.operator.install import Layout, default_config_text

            text = config_edit(default_config_text(Layout(root), PRINCIPAL, EGRESS))
            stack.config.parent.mkdir(parents=True, exist_ok=True)
            stack.config.write_text(text)
        installed = subprocess.run(
            [
                sys.executable,
                "-m",
                "qubes_mcp.dom0.operator.cli",
                "install",
                "--root",
                str(root),
                "--principal",
                PRINCIPAL,
                "--egress",
                EGRESS,
                "--exe",
                f"{sys.executable} -m qubes_mcp.dom0.operator.cli",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if installed.returncode != 0:
            raise RuntimeError(f"install failed: {installed.stderr}")
        gate_log = log_dir / f"{root.name}.gate.log"
        ready = root / "run" / "qubes-mcp" / "gate.ready"
        with gate_log.open("wb") as out:
            gate = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qubes_mcp.dom0.operator.cli",
                    "gate",
                    "--config",
                    str(stack.config),
                    "--ready-file",
                    str(ready),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        stack.procs.append(gate)
        _wait_for(ready, gate, gate_log, timeout)
    except BaseException:
        stack.stop()
        raise
    return stack
