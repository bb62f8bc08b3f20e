"""Memory: resident set size of the emulator and the gate daemon, idle and after load.

The emulator (qubesd + router in one process) and the gate are the long-lived processes; their
RSS after start, and after a burst of gate calls, with the demo fleet and with 1,000 qubes, says
whether anything grows with use or with the fleet. Read from /proc/PID/status (VmRSS, VmHWM).
"""

from __future__ import annotations

import socket
from pathlib import Path

from bench import stacks
from bench.common import Result
from qubes_mcp.stack import Stack


def _kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _gate_list(stack: Stack) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(stack.root / "run/qubes-mcp/gate.sock"))
        s.sendall(b"qmcp.List+ mcp-control keyword adminvm\0")
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def _rows(kind: str, calls: int) -> list[Result]:
    stack = stacks.stack(kind)
    emulator, gate = stack.procs[0].pid, stack.procs[1].pid
    idle = {name: _kib(pid, "VmRSS") for name, pid in (("emulator", emulator), ("gate", gate))}
    for _ in range(calls):
        _gate_list(stack)
    rows = []
    for name, pid in (("emulator", emulator), ("gate", gate)):
        after, peak = _kib(pid, "VmRSS"), _kib(pid, "VmHWM")
        rows.append(
            Result(
                name=f"memory.{name}",
                what=f"{name} RSS, {kind} fleet: idle → after {calls} qmcp.List",
                n=calls,
                notes=f"{idle[name] / 1024:.1f} MiB → {after / 1024:.1f} MiB (peak "
                f"{peak / 1024:.1f} MiB)",
                extra={"idle_kib": idle[name], "after_kib": after, "peak_kib": peak, "fleet": kind},
            )
        )
    return rows


def run(quick: bool) -> list[Result]:
    return [*_rows(stacks.DEMO, 20 if quick else 200), *_rows(stacks.BIG, 3 if quick else 20)]
