"""The research loop on the emulator, through the gate: set up a qube, snapshot it by shutting
it down, detonate, revert, start: the set-up state is back. And what the loop inspects: the
console log (readable after the qube crashed) and a running qube's resource figures.

The demo fleet's pool is ``file-reflink`` and keeps one revision per volume (R4.3's default),
which is all the loop needs: the revision a shutdown keeps is the state the run started from.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, gate_call, ok

pytestmark = pytest.mark.bwrap

QUBE = "ai-usb"  # full tier, no network


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("loop") / "root")
    try:
        yield s
    finally:
        s.stop()


def _sh(stack: Stack, script: str) -> dict[str, Any]:
    return ok(gate_call(stack, QUBE, "qmcp.Run", {"command": ["sh", "-c", script]}))


def _state(stack: Stack) -> str:
    return str(ok(gate_call(stack, QUBE, "qmcp.Info"))["state"])


def test_set_up_snapshot_detonate_revert_start(stack: Stack) -> None:
    # set up
    _sh(stack, "mkdir -p /rw/lab && echo clean > /rw/lab/config && echo 1 > /rw/lab/keep")
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))  # the snapshot: set-up state now committed
    # detonate: change, delete, add
    _sh(stack, "echo pwned > /rw/lab/config; rm /rw/lab/keep; echo x > /rw/lab/dropped")
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))  # the newest revision: the set-up state
    private = ok(gate_call(stack, QUBE, "qmcp.Info"))["volumes"]["private"]
    assert len(private["revisions"]) == 1, private  # revisions_to_keep = 1

    operator = answer_when_pending(stack, "approve", op="qube.revert")
    reverted = ok(gate_call(stack, QUBE, "qmcp.Revert", {}))
    operator.join(10)
    assert reverted["revision"] == private["revisions"][-1]

    listing = _sh(stack, "cd /rw/lab && for f in *; do echo $f=$(cat $f); done")["stdout"]
    assert listing.split() == ["config=clean", "keep=1"]
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))


def test_revert_is_undoable(stack: Stack) -> None:
    """The state reverted from became the newest revision (R4.3's ReflinkVolume.revert)."""
    _sh(stack, "echo second > /rw/lab/config")
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))
    operator = answer_when_pending(stack, "approve", op="qube.revert")
    ok(gate_call(stack, QUBE, "qmcp.Revert", {}))  # back to config=clean
    operator.join(10)
    operator = answer_when_pending(stack, "approve", op="qube.revert")
    ok(gate_call(stack, QUBE, "qmcp.Revert", {}))  # and forward again
    operator.join(10)
    assert _sh(stack, "cat /rw/lab/config")["stdout"] == "second\n"
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))


def test_resources_for_a_running_qube_only(stack: Stack) -> None:
    assert "resources" not in ok(gate_call(stack, QUBE, "qmcp.Info"))
    ok(gate_call(stack, QUBE, "qmcp.Start"))
    info = ok(gate_call(stack, QUBE, "qmcp.Info"))
    figures = info["resources"]
    assert set(figures) == {"memory_kib", "memory_max_kib", "cpu_time_ns"}, figures
    assert figures["memory_kib"] > 0 and figures["memory_max_kib"] >= figures["memory_kib"]
    ok(gate_call(stack, QUBE, "qmcp.Shutdown"))


def test_console_log_survives_a_crash_and_keeps_the_last_output(stack: Stack) -> None:
    ok(gate_call(stack, QUBE, "qmcp.Start"))
    _sh(stack, "echo last-words-before-crash >&2")
    pid_file = stack.paths.machines_dir / f"{QUBE}.pid"
    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)  # the sandbox dies
    deadline = time.monotonic() + 20
    while _state(stack) != "Halted":
        assert time.monotonic() < deadline, "the crash was not noticed"
        time.sleep(0.1)
    lines = ok(gate_call(stack, QUBE, "qmcp.Log", {"lines": 5}))["lines"]
    assert "last-words-before-crash" in lines, lines
    assert f"{QUBE} died (exit status" in lines[-1], lines
    # the crash committed the volume too: a revision was kept, as on any stop
    assert ok(gate_call(stack, QUBE, "qmcp.Info"))["volumes"]["private"]["revisions"]


def test_log_is_bounded(stack: Stack) -> None:
    got = ok(gate_call(stack, QUBE, "qmcp.Log", {"lines": 1}))
    assert len(got["lines"]) == 1 and got["truncated"] is True
