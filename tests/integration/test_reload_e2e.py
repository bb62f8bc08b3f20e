"""Issue 9 §1 end to end: the operator edits config.toml, runs ``install``, and the running
gate behaves by the new configuration at once -- or says it has not, and keeps the old one.

One gate for the whole module, never restarted: each test edits one kind of setting (guarded
qubes, consent operations, a budget, the default tier, a timeout), runs ``install``, sees the
new behaviour through qrexec, and puts the old configuration back the same way. Then a bad
configuration and a moved path are refused by ``reload`` with the old one still serving, SIGHUP
reloads, ``status`` and ``doctor`` tell a configuration on disk that is not running, and a
request that waited for consent across a reload is acted under the configuration it began with.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, gate_call, ok

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("reload") / "root")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def restore(stack: Stack) -> Iterator[None]:
    """Each test leaves the configuration it found, reloaded."""
    saved = stack.config.read_text()
    yield
    stack.config.write_text(saved)
    assert stack.admin("reload", "--root", str(stack.root)).returncode == 0


def install(stack: Stack, edit: Callable[[str], str]) -> str:
    """Edit the configuration and run ``install``: it must say the running gate reloaded."""
    stack.config.write_text(edit(stack.config.read_text()))
    done = stack.admin("install", "--root", str(stack.root))
    assert done.returncode == 0, done.stderr
    assert "the running gate reloaded its configuration" in done.stdout, done.stdout
    assert "warning" not in done.stdout  # install wrote the policy before the reload
    return done.stdout


def status(stack: Stack) -> dict[str, Any]:
    out = stack.admin("status", "--json", "--root", str(stack.root))
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def denied_by_operator(stack: Stack, target: str, service: str) -> str:
    """The code of a call while a scripted operator denies whatever waits for consent."""
    operator = answer_when_pending(stack, "deny")
    reply = gate_call(stack, target, service)
    operator.join(timeout=60)
    return code(reply) if not reply.get("ok") else "ok"


def tier_of(stack: Stack, name: str) -> str:
    listed = ok(gate_call(stack, "@adminvm", "qmcp.List"))
    return str({q["name"]: q["tier"] for q in listed["qubes"]}[name])


def test_each_kind_of_setting_takes_effect_on_install_without_a_restart(
    stack: Stack, restore: None
) -> None:
    gate_pid = stack.procs[-1].pid
    # a guarded qube: every state-changing request on it waits for the operator
    install(stack, lambda t: t.replace("timeout = 120", 'timeout = 120\nguarded = ["ai-dev"]'))
    assert denied_by_operator(stack, "ai-dev", "qmcp.Start") == "consent-denied"
    # consent operations: qube.start needs consent on every qube
    install(
        stack,
        lambda t: t.replace('guarded = ["ai-dev"]', 'operations = ["qube.start"]'),
    )
    assert denied_by_operator(stack, "ai-web", "qmcp.Start") == "consent-denied"
    # a budget, as qmcp.Budget reports it (and the gate enforces it)
    assert ok(gate_call(stack, "@adminvm", "qmcp.Budget"))["max_qubes"] == 32
    install(stack, lambda t: t.replace("max_qubes = 32", "max_qubes = 7"))
    assert ok(gate_call(stack, "@adminvm", "qmcp.Budget"))["max_qubes"] == 7
    # the default tier of an enrolled qube that carries no tier tag
    assert tier_of(stack, "ai-notes") == "read"
    install(stack, lambda t: t.replace('default_tier = "read"', 'default_tier = "exec"'))
    assert tier_of(stack, "ai-notes") == "exec"
    # a timeout (the consent timeout the control qube is told to order its own after)
    install(stack, lambda t: t.replace("timeout = 120", "timeout = 45"))
    assert ok(gate_call(stack, "@adminvm", "qmcp.List"))["consent_timeout"] == 45
    assert stack.procs[-1].pid == gate_pid and stack.procs[-1].poll() is None
    assert status(stack)["config_current"] is True


def test_a_bad_configuration_is_refused_and_the_old_one_keeps_serving(
    stack: Stack, restore: None
) -> None:
    running = status(stack)["running_config_sha256"]
    stack.config.write_text(stack.config.read_text() + "\n[budget]\nmax_qubes = 'many'\n")
    out = stack.admin("reload", "--root", str(stack.root))
    assert out.returncode == 1
    assert "reload refused: the configuration does not load" in out.stderr
    assert f"keeps running the configuration it had (sha256 {running})" in out.stderr
    # install says so too, and fails, rather than reporting success
    inst = stack.admin("install", "--root", str(stack.root))
    assert inst.returncode != 0
    # still serving, by the old configuration
    assert ok(gate_call(stack, "@adminvm", "qmcp.Budget"))["max_qubes"] == 32
    report = status(stack)
    assert report["gate"] == "serving" and report["running_config_sha256"] == running
    assert report["config_current"] is False and report["config_sha256"] != running
    doctor = stack.admin("doctor", "--root", str(stack.root))
    assert doctor.returncode == 1
    gate_log = (stack.root.parent / f"{stack.root.name}.gate.log").read_text()
    assert "RELOAD REFUSED" in gate_log


def test_a_moved_path_is_refused_by_name(stack: Stack, restore: None) -> None:
    stack.config.write_text(
        stack.config.read_text().replace("/var/log/qubes-mcp/audit.log", "/var/log/other.log")
    )
    out = stack.admin("reload", "--root", str(stack.root))
    assert out.returncode == 1
    assert "paths.audit_log cannot change while the gate runs" in out.stderr


def test_status_and_doctor_tell_an_edit_that_is_not_running(stack: Stack, restore: None) -> None:
    before = status(stack)
    assert before["gate"] == "serving" and before["config_current"] is True
    assert before["pending"] == {"count": 0, "ids": []}
    assert isinstance(before["audit_seq"], int) and before["audit_seq"] > 0
    stack.config.write_text(stack.config.read_text().replace("max_qubes = 32", "max_qubes = 9"))
    after = status(stack)
    assert after["config_current"] is False
    assert after["running_config_sha256"] == before["running_config_sha256"]
    doctor = stack.admin("doctor", "--root", str(stack.root))
    assert doctor.returncode == 1
    assert "differs from" in doctor.stdout and "qubes-mcp-admin reload" in doctor.stdout
    text = stack.admin("status", "--root", str(stack.root)).stdout
    assert "config_current: False" in text and "gate: serving" in text


def test_sighup_reloads(stack: Stack, restore: None) -> None:
    stack.config.write_text(stack.config.read_text().replace("max_qubes = 32", "max_qubes = 5"))
    stack.procs[-1].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while ok(gate_call(stack, "@adminvm", "qmcp.Budget"))["max_qubes"] != 5:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.2)
    last = [r for r in audit_lines(stack) if r["op"] == "operator.reload"][-1]
    assert last["outcome"] == "ok" and last["detail"]["signal"] == "SIGHUP"


def test_a_request_waiting_for_consent_is_acted_under_the_configuration_it_began_with(
    stack: Stack, restore: None
) -> None:
    """Under A the log keeps each command's argv; B keeps only its digest. A run that waited
    for consent across the reload to B is recorded with its argv: it acted under A."""
    gate_call(stack, "ai-dev", "qmcp.Start")  # running (or already), before it is guarded
    install(stack, lambda t: t.replace("timeout = 120", 'timeout = 120\nguarded = ["ai-dev"]'))
    waiting: dict[str, Any] = {}

    def to_b(text: str) -> str:
        return text.replace('\nguarded = ["ai-dev"]', "") + '\n[audit]\ncommands = "hash"\n'

    def reload_then_approve() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = json.loads(stack.admin("pending", "--json").stdout or "[]")
            if listed:
                waiting["id"] = listed[0]["id"]
                stack.config.write_text(to_b(stack.config.read_text()))
                waiting["install"] = stack.admin("install", "--root", str(stack.root)).stdout
                waiting["approve"] = stack.admin("approve", listed[0]["id"]).stdout
                return
            time.sleep(0.1)

    operator = threading.Thread(target=reload_then_approve, daemon=True)
    operator.start()
    reply = gate_call(stack, "ai-dev", "qmcp.Run", {"command": ["echo", "began-under-A"]})
    operator.join(timeout=90)
    assert "the running gate reloaded" in waiting.get("install", ""), waiting
    assert waiting["approve"].strip().endswith("approved"), waiting
    assert ok(reply)["stdout"] == "began-under-A\n"
    runs = [r for r in audit_lines(stack) if r["op"] == "qube.run" and r["outcome"] == "ok"]
    assert runs[-1]["detail"]["consent_id"] == waiting["id"]
    assert "argv" in runs[-1]["detail"]  # A's [audit] commands = "argv"
    # a run that starts now is under B: digest only (ai-dev is no longer guarded)
    ok(gate_call(stack, "ai-dev", "qmcp.Run", {"command": ["echo", "under-B"]}))
    runs = [r for r in audit_lines(stack) if r["op"] == "qube.run" and r["outcome"] == "ok"]
    assert "argv" not in runs[-1]["detail"] and "command_sha256" in runs[-1]["detail"]
