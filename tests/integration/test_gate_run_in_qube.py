"""``qmcp.Run`` through the whole stack ends its command in the qube (issue 11 §4): on its
timeout, and when the gate is stopped while the command runs. The run id in the audit detail is
the request id, so a restarted gate can find the processes of an unfinished run."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest

from qubes_mcp.dom0.config import load_config
from qubes_mcp.stack import start_stack
from tests.waiting import host_pids_with, until

pytestmark = pytest.mark.bwrap


def test_run_timeout_and_gate_stop_end_the_command_in_the_qube(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "root")
    try:
        payload = {"command": ["sh", "-c", "sleep 31337.61 & sleep 31337.61"], "timeout": 1}
        done = stack.call("ai-dev", "qmcp.Run", json.dumps(payload).encode())
        reply = json.loads(done.stdout)
        assert reply["ok"] is True, reply
        assert (reply["result"]["timed_out"], reply["result"]["exit_code"]) == (True, None)
        assert host_pids_with(b"sleep\x0031337.61") == []
        # the gate's configured console directory is where the emulator keeps the qube's log
        console = load_config(stack.config).paths.console_logs / "guest-ai-dev.log"
        assert console == stack.paths.console_log("ai-dev") and console.is_file()
        audit = stack.root / "var/log/qubes-mcp/audit.log"
        last = json.loads(audit.read_text().splitlines()[-1])
        assert last["detail"]["run_id"] == last["request_id"]

        # the gate stops while a command runs: the command ends in the qube too
        payload = {"command": ["sh", "-c", "setsid sleep 31337.62 & sleep 31337.62"]}
        caller = threading.Thread(
            target=stack.call, args=("ai-dev", "qmcp.Run", json.dumps(payload).encode())
        )
        caller.start()
        until(lambda: len(host_pids_with(b"sleep\x0031337.62")) == 2)
        gate = stack.procs[-1]
        gate.send_signal(signal.SIGTERM)
        gate.wait(timeout=30)
        assert host_pids_with(b"sleep\x0031337.62") == []
        caller.join(timeout=30)
    finally:
        stack.stop()
