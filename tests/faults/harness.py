"""The installed gate on the emulator, with a fault proxy in front of qubesd and a restartable
gate process; plus the checks every fault test makes after the gate comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.audit.verify import verify_log
from qubes_mcp.dom0.create import BIRTH_TAG_PREFIX, DISPOSABLE_PREFIX
from qubes_mcp.dom0.journal import SWEEP_OP
from qubes_mcp.stack import Stack, start_stack
from tests.faults.qubesd_proxy import QubesdProxy

PRINCIPAL = "mcp-control"


@dataclass
class FaultStack:
    stack: Stack
    proxy: QubesdProxy

    @property
    def root(self) -> Path:
        return self.stack.root

    @property
    def audit_log(self) -> Path:
        return self.root / "var/log/qubes-mcp/audit.log"

    @property
    def gate(self) -> subprocess.Popen[bytes]:
        return self.stack.procs[1]

    def start_gate(self, timeout: float = 60) -> None:
        """Start ``qubes-mcp-admin gate`` (recovery runs before it reports ready)."""
        ready = self.root / "run/qubes-mcp/gate.ready"
        ready.unlink(missing_ok=True)
        log = (self.root.parent / f"{self.root.name}.gate.log").open("ab")
        argv = [sys.executable, "-m", "qubes_mcp.dom0.operator.cli", "gate"]
        proc = subprocess.Popen(
            [*argv, "--config", str(self.stack.config), "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        log.close()
        self.stack.procs[1] = proc
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert proc.poll() is None, "the gate exited"
            assert time.monotonic() < deadline, "the gate did not become ready"
            time.sleep(0.02)
        self.proxy.gate_pid = proc.pid

    def kill_gate(self) -> None:
        if self.gate.poll() is None:
            self.gate.send_signal(signal.SIGKILL)
        self.gate.wait(10)

    def restart_gate(self) -> None:
        self.kill_gate()
        self.start_gate()

    def request(
        self, target: str, service: str, payload: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any] | None:
        """One request straight to the gate socket, as qrexec relays it; None: no answer."""
        kind, where = ("keyword", "adminvm") if target == "@adminvm" else ("name", target)
        raw = f"{service}+ {PRINCIPAL} {kind} {where}\0".encode()
        raw += b"" if payload is None else json.dumps(payload).encode()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.root / "run/qubes-mcp/gate.sock"))
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data) if data else None

    def dom0(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        """The operator, straight to qubesd (not through the proxy)."""
        client = AdminClient(self.stack.paths.qubesd_sock)
        return asyncio.run(client.call(dest, method, arg, payload))

    def qubes(self) -> dict[str, set[str]]:
        """Every qube on the host and its tags (dom0's view)."""
        names = [
            line.partition(" ")[0]
            for line in self.dom0("dom0", "admin.vm.List").splitlines()
            if line
        ]
        return {n: set(self.dom0(n, "admin.vm.tag.List").split()) for n in names if n != "dom0"}

    def prop(self, name: str, prop: str) -> str:
        return self.dom0(name, "admin.vm.property.Get", prop).split(" ", 2)[-1]

    def remove(self, name: str) -> None:
        with contextlib.suppress(QubesdError):  # not running
            self.dom0(name, "admin.vm.Kill")
        self.dom0(name, "admin.vm.Remove")

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


def start_fault_stack(root: Path, *, inherit: bool = False) -> FaultStack:
    root = root.resolve()
    (root / "run").mkdir(parents=True, exist_ok=True)
    proxy = QubesdProxy(root / "run/qubesd-proxy.sock", root / "run/qubesd.sock", inherit)
    proxy.start()

    def through_proxy(text: str) -> str:
        return text.replace(f"{root}/run/qubesd.sock", f"{root}/run/qubesd-proxy.sock")

    stack = start_stack(root, config_edit=through_proxy)
    fs = FaultStack(stack, proxy)
    proxy.gate_pid = fs.gate.pid
    return fs


def assert_recovered(fs: FaultStack, *, decided_netvm: dict[str, str]) -> None:
    """What must hold after any fault and a restart of the gate.

    ``decided_netvm``: qube name → the netvm the gate decided for it (a born qube must have it).
    """
    # no qube the gate began to create is left half-born: no birth marker anywhere, and every
    # gate-born disposable is either gone or a complete member of the scope
    for name, tags in fs.qubes().items():
        assert not {t for t in tags if t.startswith(BIRTH_TAG_PREFIX)}, (name, tags)
        if name.startswith(DISPOSABLE_PREFIX):
            assert {"ai-managed", f"ai-owner-{PRINCIPAL}"} <= tags, (name, tags)
    # everything an agent can see is complete: listed qubes that the gate created have the
    # decided netvm and nothing inherited; every listed qube answers info
    listed = fs.request("@adminvm", "qmcp.List")
    assert listed is not None and listed["ok"], listed
    for item in listed["result"]["qubes"]:
        name = item["name"]
        if name in decided_netvm or name.startswith(DISPOSABLE_PREFIX):
            assert fs.prop(name, "netvm") == decided_netvm.get(name, "ai-egress"), name
            assert fs.prop(name, "provides_network") == "False", name
    # every request has exactly one outcome; the log verifies with nothing left open
    records = [r for r in fs.audit() if r["op"] != SWEEP_OP]  # dom0's own follow-up lines
    outcomes = Counter(r["request_id"] for r in records if r["outcome"] != "pending")
    for record in records:
        if record["request_id"]:
            assert outcomes[record["request_id"]] == 1, record
    result = verify_log(fs.audit_log)
    assert result.ok, result.error
    assert result.unfinished == (), result.unfinished
