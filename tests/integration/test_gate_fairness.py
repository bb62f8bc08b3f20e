"""No principal can slow another; every request that reaches the gate is answered and recorded;
a caller that hangs up withdraws its request (issue 11 §2, §4; issue 7 §2, §6).

The real gate daemon (``qubes-mcp-admin gate``, installed into an emulated dom0) is driven on its
socket exactly as qrexec drives it (tests/gate_socket.py), and through the emulated qrexec
router from inside the principal's qube where the relay itself is under test. Two principals
share one scope: ``mcp-control`` (the one that must stay served) and ``mcp-flood``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.daemon import BUSY_WINDOW
from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import audit_lines, dom0_admin
from tests.gate_socket import connect, descriptor, read_reply, request

FLOOD = "mcp-flood"
#: a second flooder, so that one test's flood never meets another's
FLOOD_TOO = "mcp-flood2"
VICTIM = "mcp-control"
READ_TIMEOUT = 8
BUSY = {
    "ok": False,
    "error": {
        "code": "busy",
        "message": "too many requests from this qube at once; try again shortly",
    },
}


def with_limits(text: str, limits: str) -> str:
    """The installed configuration plus the flooding principals and the given [limits]."""
    flood = "".join(
        f'[[principal]]\nqube = "{qube}"\nscope = "ai"\nceiling = "full"\n'
        f'name_prefix = "fl{i}-"\n\n'
        for i, qube in enumerate((FLOOD, FLOOD_TOO))
    )
    return text.replace("[budget]", flood + "[budget]") + f"\n[limits]\n{limits}\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    limits = f"concurrent_requests = 2\nopen_requests = 64\nrequest_read_timeout = {READ_TIMEOUT}"
    s = start_stack(
        tmp_path_factory.mktemp("fair") / "root",
        config_edit=lambda text: with_limits(text, limits),
    )
    try:
        yield s
    finally:
        s.stop()


def gate_sock(stack: Stack) -> Path:
    return stack.root / "run/qubes-mcp/gate.sock"


def pending(stack: Stack) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(stack.admin("pending", "--json").stdout or "[]")
    return listed


def wait_for(condition: Any, timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def hold_the_share(path: Path, flooder: str) -> list[socket.socket]:
    """Fill ``flooder``'s share with requests held open without EOF; returns once the gate
    refuses the next one ``busy`` (it has taken them all in)."""
    held = [
        connect(path, descriptor("qmcp.Info", flooder, "ai-dev") + b'{"partial') for _ in range(64)
    ]
    wait_for(
        lambda: request(path, "qmcp.List", flooder)[0] == BUSY, timeout=30, what="a full share"
    )
    return held


def lines_for(stack: Stack, **match: object) -> list[dict[str, Any]]:
    return [
        line
        for line in audit_lines(stack)
        if all(line.get(k) == v for k, v in match.items())  # type: ignore[misc]
    ]


# --- no principal can slow another -----------------------------------------------------------


def test_one_principal_flooding_cannot_slow_another(stack: Stack) -> None:
    """64 requests held open without EOF, 500 connections that never send a byte and 200 more
    requests over the flooder's share: the other principal's Info and List stay within 2 s."""
    path = gate_sock(stack)
    held = hold_the_share(path, FLOOD)
    opened: list[socket.socket] = []
    try:
        over = [connect(path, descriptor("qmcp.Info", FLOOD, "ai-dev")) for _ in range(200)]
        opened += over
        opened += [connect(path) for _ in range(500)]
        # over its share, the flooder is refused at once, without queueing
        for sock in over[:20]:
            assert read_reply(sock) == BUSY
        times = []
        for _ in range(10):
            for service, target in (("qmcp.Info", "ai-dev"), ("qmcp.List", None)):
                reply, took = request(path, service, VICTIM, target)
                assert reply is not None and reply["ok"] is True, reply
                times.append(took)
        assert max(times) < 2.0, sorted(times)[-5:]
        # the floods were still in place the whole time: no held request has been answered
        for sock in held[:5]:
            sock.settimeout(0)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in held + opened:
            sock.close()


def test_requests_over_the_share_are_recorded_in_one_summary_line(stack: Stack) -> None:
    path = gate_sock(stack)
    held = hold_the_share(path, FLOOD_TOO)
    try:
        before = len(lines_for(stack, principal=FLOOD_TOO, op="qube.start", code="busy"))
        start = time.monotonic()
        for _ in range(30):
            reply, _ = request(path, "qmcp.Start", FLOOD_TOO, "ai-dev")
            assert reply == BUSY
        windows = (time.monotonic() - start) // BUSY_WINDOW + 1

        def counted() -> int:
            new = lines_for(stack, principal=FLOOD_TOO, op="qube.start", code="busy")[before:]
            assert all((n["decision"], n["outcome"]) == ("refused", "not-run") for n in new)
            return sum(int(n["detail"]["reason"].split(" ")[0]) for n in new)

        wait_for(lambda: counted() == 30, timeout=10, what="30 refusals summarised")
        lines = lines_for(stack, principal=FLOOD_TOO, op="qube.start", code="busy")[before:]
        assert len(lines) <= windows  # one line per window, not one per request
    finally:
        for sock in held:
            sock.close()


def test_a_request_that_never_completes_is_refused_in_time_and_recorded(stack: Stack) -> None:
    path = gate_sock(stack)
    with connect(path, descriptor("qmcp.Start", VICTIM, "ai-dev") + b'{"never') as sock:
        sock.settimeout(READ_TIMEOUT + 20)
        start = time.monotonic()
        reply = read_reply(sock)
    assert reply is not None and reply["error"]["code"] == "invalid-input", reply
    assert READ_TIMEOUT - 1 <= time.monotonic() - start < READ_TIMEOUT + 10
    line = lines_for(stack, principal=VICTIM, op="qube.start")[-1]
    assert (line["decision"], line["outcome"], line["code"]) == (
        "refused",
        "not-run",
        "invalid-input",
    )
    assert line["targets"] == ["ai-dev"]


def test_a_connection_that_never_names_itself_is_dropped(stack: Stack) -> None:
    with connect(gate_sock(stack)) as sock:
        sock.settimeout(20)
        start = time.monotonic()
        assert read_reply(sock) is None
        assert time.monotonic() - start < 10


# --- every request that reaches the gate is answered and recorded ----------------------------


def test_an_oversized_state_changing_request_is_refused_and_recorded(stack: Stack) -> None:
    before = len(audit_lines(stack))
    body = json.dumps({"command": ["true"], "stdin": "x" * 70_000}).encode()
    reply, _ = request(gate_sock(stack), "qmcp.Run", VICTIM, "ai-dev", body)
    assert reply is not None and reply["error"]["code"] == "invalid-input", reply
    new = audit_lines(stack)[before:]
    assert [(n["op"], n["decision"], n["outcome"], n["code"]) for n in new] == [
        ("qube.run", "refused", "not-run", "invalid-input")
    ]
    assert new[0]["principal"] == VICTIM and new[0]["targets"] == ["ai-dev"]


def test_an_oversized_read_is_refused_and_not_recorded(stack: Stack) -> None:
    """Reads are never audited (they change nothing); the refusal is still answered."""
    before = len(audit_lines(stack))
    reply, _ = request(gate_sock(stack), "qmcp.Info", VICTIM, "ai-dev", b" " * 70_000)
    assert reply is not None and reply["error"]["code"] == "invalid-input", reply
    assert len(audit_lines(stack)) == before


@pytest.mark.bwrap
def test_large_requests_through_qrexec_get_the_ordinary_refusal(stack: Stack) -> None:
    """From inside the principal's qube, through its qrexec client and the router: the gate
    refuses after reading its cap and stops reading; the router must still relay its reply
    (as qrexec does) rather than lose it when its next write to the gate fails."""
    qvm_run = str(stack.root / "usr/bin/qvm-run")
    env = dict(os.environ, QUBES_SIM_ROOT=str(stack.root))
    before = _refusals_recorded(stack)
    sizes = [200_000] * 4 + [3_000_000] * 4
    for size in sizes:
        script = (
            f"head -c {size} /dev/zero | tr '\\0' x 2>/dev/null "
            "| qrexec-client-vm ai-dev qmcp.Run; echo rc=$?"
        )
        done = subprocess.run(
            [qvm_run, "--pass-io", "--no-gui", VICTIM, script],
            capture_output=True,
            timeout=120,
            env=env,
            check=False,
        )
        reply_line, rc = done.stdout.decode().rsplit("\n", 2)[:2]
        assert rc == "rc=0", done
        assert json.loads(reply_line)["error"] == {
            "code": "invalid-input",
            "message": "request is larger than 65536 bytes",
        }, (size, done.stdout)
    # each one is recorded: in full, or (past the first few of a window) counted in the
    # window's summary line, written when the window ends (audit/summary.py)
    wait_for(
        lambda: _refusals_recorded(stack) == before + len(sizes),
        timeout=30,
        what="every refusal in the log",
    )


def _refusals_recorded(stack: Stack) -> int:
    """Refused ``qube.run`` requests of the victim with ``invalid-input``: lines + counted."""
    match = {"principal": VICTIM, "op": "qube.run", "code": "invalid-input"}
    full = [line for line in lines_for(stack, **match) if line["request_id"] != "refusals-summary"]
    counted = sum(
        int(line["detail"].get("count", 0))
        for line in lines_for(stack, **match)
        if line["request_id"] == "refusals-summary"
    )
    return len(full) + counted


# --- a caller that hangs up withdraws its request --------------------------------------------


def _sim_call(stack: Stack, target: str, service: str) -> subprocess.Popen[bytes]:
    """``qubes-mcp sim call`` as the principal: the agent's qrexec client."""
    argv = [sys.executable, "-m", "qubes_mcp.cli", "sim", "call", "--root", str(stack.root)]
    return subprocess.Popen(
        [*argv, "--from", VICTIM, target, service],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_remove_waiting_for_consent_is_withdrawn_when_the_client_disconnects(
    stack: Stack,
) -> None:
    client = _sim_call(stack, "ai-build", "qmcp.Remove")
    try:
        waiting = wait_for(
            lambda: [p for p in pending(stack) if p["op"] == "qube.remove"], what="the consent"
        )[0]
    finally:
        client.kill()  # the agent's client goes away: qrexec closes the call
        client.wait()
    wait_for(lambda: not pending(stack), timeout=10, what="the withdrawal")
    answer = stack.admin("approve", waiting["id"], "--digest", waiting["digest"])
    assert "approved" not in answer.stdout
    assert "ai-build" in dom0_admin(stack, "dom0", "admin.vm.List")
    line = lines_for(stack, op="qube.remove", code="withdrawn")[-1]
    assert (line["principal"], line["decision"], line["outcome"]) == (
        VICTIM,
        "refused",
        "not-run",
    )
    # the wait was journaled before the operator was asked (so recovery can record a question
    # the gate died waiting on); the request never went further: that line and its refusal
    mine = [x for x in audit_lines(stack) if x["request_id"] == line["request_id"]]
    assert [x["outcome"] for x in mine] == ["pending", "not-run"]
    assert mine[0]["detail"]["consent"] == "asked"


def test_a_queued_request_is_withdrawn_when_its_caller_hangs_up(stack: Stack) -> None:
    """The flooder's two acting slots wait for the operator; a third request queues behind
    them, its caller hangs up, and it never starts."""
    path = gate_sock(stack)
    waiting = []
    for _ in range(2):
        sock = connect(path, descriptor("qmcp.Remove", FLOOD, "ai-build"))
        sock.shutdown(socket.SHUT_WR)
        waiting.append(sock)
    try:
        wait_for(lambda: len(pending(stack)) == 2, what="two consents")
        before = len(audit_lines(stack))
        queued = connect(path, descriptor("qmcp.Shutdown", FLOOD, "ai-dev"))
        queued.shutdown(socket.SHUT_WR)
        time.sleep(0.5)  # it is queued now: nothing recorded yet, nothing done
        assert len(audit_lines(stack)) == before
        queued.close()
        line = wait_for(
            lambda: lines_for(stack, principal=FLOOD, op="qube.shutdown", code="withdrawn"),
            timeout=10,
            what="the withdrawal line",
        )[-1]
        assert (line["decision"], line["outcome"]) == ("refused", "not-run")
        assert not lines_for(stack, principal=FLOOD, op="qube.shutdown", outcome="pending")
    finally:
        for item in pending(stack):
            stack.admin("deny", item["id"])
        for sock in waiting:
            assert read_reply(sock) == {
                "ok": False,
                "error": {
                    "code": "consent-denied",
                    "message": "the operator did not approve this request",
                },
            }
            sock.close()


def test_a_request_whose_caller_is_gone_before_it_is_handled_never_acts(stack: Stack) -> None:
    """The caller sends a whole request and is gone before the gate gets to it: the gate
    decides it, and refuses it at the last moment before acting."""
    before = dom0_admin(stack, "ai-web", "admin.vm.CurrentState")
    sock = connect(gate_sock(stack), descriptor("qmcp.Start", VICTIM, "ai-web"))
    sock.close()
    line = wait_for(
        lambda: lines_for(stack, principal=VICTIM, op="qube.start", targets=["ai-web"]),
        timeout=10,
        what="the withdrawal line",
    )[-1]
    assert (line["decision"], line["outcome"], line["code"]) == ("refused", "not-run", "withdrawn")
    assert dom0_admin(stack, "ai-web", "admin.vm.CurrentState") == before
    assert "power_state=Halted" in before


def test_the_audit_chain_verifies(stack: Stack) -> None:
    result = stack.admin("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


# --- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_with_requests_waiting_answers_them_and_logs_one_line(tmp_path: Path) -> None:
    s = start_stack(tmp_path / "root")
    try:
        path = gate_sock(s)
        waiting = []
        for target in ("ai-build", "ai-usb", "ai-build"):
            sock = connect(path, descriptor("qmcp.Remove", VICTIM, target))
            sock.shutdown(socket.SHUT_WR)
            waiting.append(sock)
        wait_for(lambda: len(pending(s)) == 3, what="three consents")
        gate = s.procs[-1]
        gate.send_signal(signal.SIGTERM)
        assert gate.wait(timeout=30) == 0
        for sock in waiting:
            reply = read_reply(sock)
            assert reply is not None and reply["error"]["code"] == "unavailable", reply
            sock.close()
        log = (tmp_path / "root.gate.log").read_text()
        assert "Traceback" not in log, log
        assert len([ln for ln in log.splitlines() if "stopping" in ln]) == 1, log
        refused = [ln for ln in audit_lines(s) if ln["code"] == "unavailable"]
        assert sorted(ln["targets"][0] for ln in refused) == ["ai-build", "ai-build", "ai-usb"]
        assert all(ln["outcome"] == "not-run" for ln in refused)
        verified = s.admin("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        s.stop()
