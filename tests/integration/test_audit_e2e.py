"""Issue 9 §2 on the emulator: what the agent ran is in the audit log (escaped, capped, or only
hashed), the operator's acts are in the same chain with their uid, and ``audit show`` reads it
as a timeline that no agent value can forge a line in."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, gate_call, ok

pytestmark = pytest.mark.bwrap

HOSTILE_ARG = "x\n2027-01-01T00:00:00Z #999 operator:0 operator.tier vault allowed/ok\x1b[2J"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("audit") / "root")
    try:
        yield s
    finally:
        s.stop()


def _outcome(stack: Stack, op: str) -> dict[str, Any]:
    """The last outcome (not pending) record of ``op``."""
    return [r for r in audit_lines(stack) if r["op"] == op and r["outcome"] != "pending"][-1]


def test_a_run_records_its_argv_escaped_and_the_rest(stack: Stack) -> None:
    ok(gate_call(stack, "ai-dev", "qmcp.Start"))
    argv = ["sh", "-c", "cat >/dev/null; echo out; exit 4", HOSTILE_ARG]
    reply = ok(gate_call(stack, "ai-dev", "qmcp.Run", {"command": argv, "stdin": "abc"}))
    assert reply["exit_code"] == 4
    detail = _outcome(stack, "qube.run")["detail"]
    assert detail["argv"] == [
        "sh",
        "-c",
        "cat >/dev/null; echo out; exit 4",
        "x\\x0a2027-01-01T00:00:00Z #999 operator:0 operator.tier vault allowed/ok\\x1b[2J",
    ]
    assert detail["command_sha256"] == hashlib.sha256("\0".join(argv).encode()).hexdigest()
    assert detail["stdin_bytes"] == 3
    assert detail["stdin_sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert (detail["exit_code"], detail["stdout_bytes"], detail["stderr_bytes"]) == (4, 4, 0)


def test_audit_show_cannot_be_forged_by_an_argument(stack: Stack) -> None:
    shown = stack.admin("audit", "show", "--op", "qube.run")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert all(line.isascii() and line.isprintable() for line in lines)
    assert not any(line.startswith("2027-01-01") for line in lines)  # no forged line
    run = [line for line in lines if "\\x1b[2J" in line]
    assert len(run) == 1 and "x\\x0a2027-01-01" in run[0] and "exit_code=4" in run[0]


def test_an_argv_above_the_cap_is_capped_and_hashed(stack: Stack) -> None:
    argv = ["echo", "y" * 3000, "z" * 3000]
    ok(gate_call(stack, "ai-dev", "qmcp.Run", {"command": argv}))
    detail = _outcome(stack, "qube.run")["detail"]
    assert detail["argv_capped"] is True
    assert detail["argv"][:2] == ["echo", "y" * 3000]
    assert detail["argv"][2].startswith("zzz") and detail["argv"][2].endswith("chars]")
    assert len(json.dumps(detail["argv"], ensure_ascii=False)) <= 4096 + 40
    assert detail["command_sha256"] == hashlib.sha256("\0".join(argv).encode()).hexdigest()


def test_operator_acts_are_in_the_chain_with_their_uid(stack: Stack) -> None:
    assert stack.admin("tier", "ai-notes", "exec").returncode == 0
    assert stack.admin("tier", "ai-notes", "read").returncode == 0
    acts = [r for r in audit_lines(stack) if r["op"] == "operator.tier"]
    assert [r["outcome"] for r in acts] == ["pending", "ok", "pending", "ok"]
    assert {r["principal"] for r in acts} == {f"operator:{os.getuid()}"}
    assert acts[0]["targets"] == ["ai-notes"] and acts[0]["detail"]["tier"] == "exec"
    verify = stack.admin("audit", "verify")
    assert verify.returncode == 0, verify.stdout


def test_deny_is_recorded_before_the_request_it_answers(stack: Stack) -> None:
    operator = answer_when_pending(stack, "deny", op="qube.remove")
    reply = gate_call(stack, "ai-build", "qmcp.Remove")  # needs consent
    operator.join(60)
    assert reply["error"]["code"] == "consent-denied"
    records = audit_lines(stack)
    deny = next(i for i, r in enumerate(records) if r["op"] == "operator.deny")
    # the consent wait is journaled first (a pending line); the refusal is the request's outcome
    removal = next(
        i for i, r in enumerate(records) if r["op"] == "qube.remove" and r["outcome"] != "pending"
    )
    assert deny < removal and records[removal]["decision"] == "refused"
    assert records[deny]["principal"] == f"operator:{os.getuid()}"  # SO_PEERCRED
    assert records[deny]["targets"] == ["ai-build"] == records[removal]["targets"]
    shown = stack.admin("audit", "show", "--op", "operator.*", "--json")
    ops = [json.loads(line)["op"] for line in shown.stdout.splitlines()]
    assert "operator.deny" in ops and "operator.tier" in ops


def test_hash_mode_stores_no_argv(tmp_path_factory: pytest.TempPathFactory) -> None:
    hashed = start_stack(
        tmp_path_factory.mktemp("audit-hash") / "root",
        config_edit=lambda text: text + '\n[audit]\ncommands = "hash"\n',
    )
    try:
        ok(gate_call(hashed, "ai-dev", "qmcp.Start"))
        ok(gate_call(hashed, "ai-dev", "qmcp.Run", {"command": ["echo", "secret-arg"]}))
        detail = _outcome(hashed, "qube.run")["detail"]
        assert "argv" not in detail and "command_sha256" in detail
        log = (hashed.root / "var/log/qubes-mcp/audit.log").read_text()
        assert "secret-arg" not in log
    finally:
        hashed.stop()
