"""Attacks on ``qube.revert``, ``qube.log`` and what ``qube.info`` adds (revisions, resources).

- scope: a hidden qube and a made-up name get the very same answer, for every new operation;
- tier: revert needs full (exec is refused before the operator is asked), log needs read;
- consent: a revert waits for the operator; a denied one changes nothing; the audit records
  the revision reverted to;
- state: a running qube's revert is ``invalid-state`` before the operator is asked;
- log: a qube writes control sequences and invalid bytes to its console; they arrive escaped.

Run end to end on the emulator (demo fleet: ``file-reflink``, one revision kept).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, gate_call, ok

pytestmark = pytest.mark.bwrap

FULL = "ai-usb"  # full tier, no network
EXEC = "ai-dev"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("revert") / "root")
    try:
        yield s
    finally:
        s.stop()


def _last(stack: Stack, op: str) -> dict[str, object]:
    return [x for x in audit_lines(stack) if x["op"] == op][-1]


def _run(stack: Stack, qube: str, script: str) -> dict[str, object]:
    return ok(gate_call(stack, qube, "qmcp.Run", {"command": ["sh", "-c", script]}))


def _shutdown(stack: Stack, qube: str) -> None:
    assert ok(gate_call(stack, qube, "qmcp.Shutdown"))["state"] == "Halted"


@pytest.mark.parametrize(
    ("service", "payload"),
    [
        ("qmcp.Revert", {}),
        ("qmcp.Revert", {"revision": "1"}),
        ("qmcp.Log", {"lines": 5}),
        ("qmcp.Info", None),
    ],
)
def test_a_hidden_qube_and_a_missing_one_get_the_same_answer(
    stack: Stack, service: str, payload: dict[str, object] | None
) -> None:
    hidden = gate_call(stack, "vault", service, payload)
    missing = gate_call(stack, "no-such-qube", service, payload)
    assert hidden == missing


def test_revert_at_exec_is_refused_before_the_operator_is_asked(stack: Stack) -> None:
    reply = gate_call(stack, EXEC, "qmcp.Revert", {})
    assert code(reply) == "insufficient-tier", reply
    line = _last(stack, "qube.revert")
    assert (line["decision"], line["outcome"]) == ("refused", "not-run")
    assert "consent" not in line["detail"]  # type: ignore[operator]


def test_log_needs_read_only(stack: Stack) -> None:
    assert "lines" in ok(gate_call(stack, "ai-notes", "qmcp.Log", {"lines": 3}))


def test_running_qube_revert_is_invalid_state_before_consent(stack: Stack) -> None:
    ok(gate_call(stack, FULL, "qmcp.Start"))
    reply = gate_call(stack, FULL, "qmcp.Revert", {})
    assert code(reply) == "invalid-state", reply
    line = _last(stack, "qube.revert")
    assert "consent" not in line["detail"]  # type: ignore[operator]
    _shutdown(stack, FULL)


@pytest.mark.parametrize("revision", ["../1", "1 2", "", "-1", "x" * 65, "1\n"])
def test_a_malformed_revision_is_refused_before_consent(stack: Stack, revision: str) -> None:
    assert code(gate_call(stack, FULL, "qmcp.Revert", {"revision": revision})) == "invalid-input"


def test_revert_waits_for_consent_denied_changes_nothing_approved_is_audited(
    stack: Stack,
) -> None:
    _run(stack, FULL, "echo kept > /rw/marker")
    _shutdown(stack, FULL)  # revision of the state before; /rw/marker is now committed
    _run(stack, FULL, "rm /rw/marker; echo junk > /rw/junk")
    _shutdown(stack, FULL)  # the newest revision holds /rw/marker
    revisions = ok(gate_call(stack, FULL, "qmcp.Info"))["volumes"]["private"]["revisions"]
    assert revisions, revisions
    newest = revisions[-1]

    private = stack.paths.private_dir(FULL)
    operator = answer_when_pending(stack, "deny", op="qube.revert")
    assert code(gate_call(stack, FULL, "qmcp.Revert", {})) == "consent-denied"
    operator.join(10)
    assert (private / "junk").exists() and not (private / "marker").exists()

    operator = answer_when_pending(stack, "approve", op="qube.revert")
    done = ok(gate_call(stack, FULL, "qmcp.Revert", {"revision": newest}))
    operator.join(10)
    assert done == {"qube": FULL, "volume": "private", "revision": newest}
    assert (private / "marker").read_text() == "kept\n" and not (private / "junk").exists()
    line = _last(stack, "qube.revert")
    detail = line["detail"]
    assert line["outcome"] == "ok"
    assert detail["consent"] == "approved"  # type: ignore[index]
    assert (detail["revision"], detail["volume"]) == (newest, "private")  # type: ignore[index]


def test_the_consent_text_says_what_is_lost(stack: Stack) -> None:
    seen: list[str] = []

    import json
    import threading
    import time

    def operator() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for item in json.loads(stack.admin("pending", "--json").stdout or "[]"):
                if item["op"] == "qube.revert":
                    seen.append(stack.admin("show", item["id"]).stdout)
                    stack.admin("deny", item["id"])
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    gate_call(stack, FULL, "qmcp.Revert", {})
    thread.join(30)
    assert seen, "no pending revert"
    text = seen[0]
    assert re.search(r"REVERT the private volume of qube '?ai-usb'? to its newest revision", text)
    assert "since that revision is lost" in text


def test_a_console_log_arrives_escaped(stack: Stack) -> None:
    ok(gate_call(stack, FULL, "qmcp.Start"))
    # what the qube writes on its console (a call's stderr goes there too): an escape
    # sequence, a bell, invalid UTF-8
    _run(stack, FULL, r"printf 'EVIL\033]0;title\007\377\n' >&2")
    lines = ok(gate_call(stack, FULL, "qmcp.Log", {"lines": 50}))["lines"]
    evil = [line for line in lines if line.startswith("EVIL")]
    assert evil == ["EVIL\\x1b]0;title\\x07\\xff"], lines
    assert all(re.fullmatch(r"[\x20-\x7e]*", line) for line in lines)
    _shutdown(stack, FULL)
