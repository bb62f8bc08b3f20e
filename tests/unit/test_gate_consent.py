"""The consent broker: an answer is bound to the exact request; silence, a "no" and a hang-up
are three different refusals; and what the operator is shown cannot drive their terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.consent import RECENT_ANSWERS, ConsentBroker, request_digest
from qubes_mcp.dom0.describe import Description, Line, Val, describe
from qubes_mcp.dom0.errors import (
    ConsentDeniedError,
    ConsentTimeoutError,
    ConsentWithdrawnError,
    GateError,
)
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME

ARGS = {
    "principal": "mcp-control",
    "op": "qube.remove",
    "target": "ai-x",
    "args": {},
    "description": describe(OPERATIONS_BY_NAME["qube.remove"], "ai-x", {}),
    "reasons": ("qube.remove needs consent",),
}


async def _ask_and(
    broker: ConsentBroker, answer: str, digest: str | None = None
) -> tuple[str, object]:
    task = asyncio.create_task(broker.ask(**ARGS))  # type: ignore[arg-type]
    while not broker.pending():
        await asyncio.sleep(0)
    request = broker.pending()[0]
    result = broker.answer(
        request.id, approve=answer == "approve", digest=request.digest if digest is None else digest
    )
    if result == "mismatch":
        broker.answer(request.id, approve=False)
    try:
        return result, await task
    except GateError as exc:
        return result, exc


def test_approval_with_the_shown_digest_goes_through() -> None:
    result, outcome = asyncio.run(_ask_and(ConsentBroker(10), "approve"))
    assert result == "approved" and isinstance(outcome, str)


def test_denial_is_a_refusal() -> None:
    result, outcome = asyncio.run(_ask_and(ConsentBroker(10), "deny"))
    assert result == "denied" and isinstance(outcome, ConsentDeniedError)


def test_an_approval_for_another_request_is_not_an_approval() -> None:
    other = request_digest("mcp-control", "qube.remove", "ai-other", {})
    result, outcome = asyncio.run(_ask_and(ConsentBroker(10), "approve", digest=other))
    assert result == "mismatch" and isinstance(outcome, ConsentDeniedError)


def test_no_answer_in_time_is_its_own_refusal_and_leaves_nothing_pending() -> None:
    broker = ConsentBroker(0.05)
    with pytest.raises(ConsentTimeoutError) as caught:
        asyncio.run(broker.ask(**ARGS))  # type: ignore[arg-type]
    assert caught.value.code == "consent-timeout" != ConsentDeniedError.code
    assert broker.pending() == []


async def _ask_then_hang_up(broker: ConsentBroker) -> tuple[str, list[object], str]:
    hangup = asyncio.Event()
    task = asyncio.create_task(broker.ask(**ARGS, withdrawn=hangup))  # type: ignore[arg-type]
    while not broker.pending():
        await asyncio.sleep(0)
    request_id = broker.pending()[0].id
    hangup.set()
    with pytest.raises(ConsentWithdrawnError) as caught:
        await task
    return caught.value.code, list(broker.pending()), request_id


def test_a_hang_up_withdraws_the_request_and_a_later_approval_is_told_so() -> None:
    broker = ConsentBroker(30)
    code, pending, request_id = asyncio.run(_ask_then_hang_up(broker))
    assert (code, pending) == ("withdrawn", [])
    digest = request_digest("mcp-control", "qube.remove", "ai-x", {})
    assert broker.answer(request_id, approve=True, digest=digest) == "withdrawn"
    assert broker.show(request_id) is None


def test_a_caller_gone_before_the_question_is_never_asked() -> None:
    broker = ConsentBroker(30)
    hangup = asyncio.Event()
    hangup.set()
    with pytest.raises(ConsentWithdrawnError):
        asyncio.run(broker.ask(**ARGS, withdrawn=hangup))  # type: ignore[arg-type]
    assert broker.pending() == []


def test_late_answers_say_why_and_the_memory_of_them_is_bounded() -> None:
    broker = ConsentBroker(0.01)
    with pytest.raises(ConsentTimeoutError):
        asyncio.run(broker.ask(**ARGS))  # type: ignore[arg-type]
    (timed_out,) = broker._recent
    assert broker.answer(timed_out, approve=True) == "timed-out"
    broker10 = ConsentBroker(10)
    asyncio.run(_ask_and(broker10, "deny"))
    (denied,) = broker10._recent
    assert broker10.answer(denied, approve=True) == "already-answered"
    for n in range(RECENT_ANSWERS + 10):
        broker._remember(f"{n:08x}", "withdrawn")
    assert len(broker._recent) == RECENT_ANSWERS and timed_out not in broker._recent


def test_unknown_or_answered_ids_are_unknown() -> None:
    broker = ConsentBroker(10)
    assert broker.answer("deadbeef", approve=True, digest="x") == "unknown"


def test_digest_covers_every_argument() -> None:
    a = request_digest("p", "qube.run", "ai-x", {"command": ["ls"]})
    b = request_digest("p", "qube.run", "ai-x", {"command": ["rm"]})
    assert a != b


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("ls \x1b[2J\x1b]0;pwned\x07", "ls \\x1b[2J\\x1b]0;pwned\\x07"),
        ("a\rb", "a\\rb"),
        ("line one\nwhy: forged", "line one\\nwhy: forged"),
        ("x\u202eevil", "x\\u202eevil"),
    ],
    ids=["terminal-escapes", "carriage-return", "agent-newline", "bidi-override"],
)
def test_what_the_operator_is_shown_cannot_drive_their_terminal(text: str, shown: str) -> None:
    broker = ConsentBroker(10)
    description = Description((Line(("value: ", Val("value", text))),))

    async def go() -> str:
        task = asyncio.create_task(broker.ask(**{**ARGS, "description": description}))  # type: ignore[arg-type]
        while not broker.pending():
            await asyncio.sleep(0)
        request = broker.pending()[0]
        broker.answer(request.id, approve=False)
        with contextlib.suppress(ConsentDeniedError):
            await task
        return request.view.text

    assert asyncio.run(go()) == "value: " + shown


def _dialog(tmp_path: Path, body: str) -> tuple[str, ...]:
    script = tmp_path / "dialog"
    script.write_text(f"#!/bin/sh\nprintf '%s' \"$2\" > {tmp_path}/shown\n{body}\n")
    script.chmod(0o755)
    return (str(script), "--title={title}", "{text}")


@pytest.mark.parametrize(
    ("body", "approved"),
    [("exit 0", True), ("exit 1", False)],
    ids=["dialog-approves", "dialog-denies"],
)
def test_a_desktop_dialog_answers_its_request(tmp_path: Path, body: str, approved: bool) -> None:
    broker = ConsentBroker(30, dialog=_dialog(tmp_path, body))
    if approved:
        assert isinstance(asyncio.run(broker.ask(**ARGS)), str)  # type: ignore[arg-type]
    else:
        with pytest.raises(ConsentDeniedError):
            asyncio.run(broker.ask(**ARGS))  # type: ignore[arg-type]
    assert (tmp_path / "shown").read_text().startswith("qube.remove: REMOVE qube ai-x")


def test_a_dialog_left_open_is_closed_when_time_runs_out(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    broker = ConsentBroker(0.5, dialog=_dialog(tmp_path, f"echo $$ > {pidfile}; exec sleep 60"))
    with pytest.raises(ConsentTimeoutError):
        asyncio.run(broker.ask(**ARGS))  # type: ignore[arg-type]
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_missing_dialog_leaves_the_cli_as_the_way_to_answer(tmp_path: Path) -> None:
    broker = ConsentBroker(30, dialog=(str(tmp_path / "no-such-dialog"),))
    result, outcome = asyncio.run(_ask_and(broker, "approve"))
    assert result == "approved" and isinstance(outcome, str)


def test_the_dialog_gets_the_escaped_view_as_its_text(tmp_path: Path) -> None:
    hostile = "x\n\nwhy: pre-approved\x1b[8m\u202e\u2028"
    run = OPERATIONS_BY_NAME["qube.run"]
    args = {"command": ["sh", "-c", hostile], "stdin": hostile, "timeout": 60}
    broker = ConsentBroker(30, dialog=_dialog(tmp_path, "exit 1"))
    request: dict[str, Any] = {
        **ARGS,
        "op": "qube.run",
        "args": args,
        "description": describe(run, "ai-x", args),
    }
    with pytest.raises(ConsentDeniedError):
        asyncio.run(broker.ask(**request))
    shown = (tmp_path / "shown").read_text()
    assert all(ch == "\n" or " " <= ch <= "~" for ch in shown)
    assert [ln for ln in shown.split("\n") if ln.startswith("why:")] == [
        "why: qube.remove needs consent"
    ]


def test_a_dialog_left_open_is_closed_when_the_caller_hangs_up(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    broker = ConsentBroker(30, dialog=_dialog(tmp_path, f"echo $$ > {pidfile}; exec sleep 60"))

    async def go() -> None:
        hangup = asyncio.Event()
        task = asyncio.create_task(broker.ask(**ARGS, withdrawn=hangup))  # type: ignore[arg-type]
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        hangup.set()
        with pytest.raises(ConsentWithdrawnError):
            await task

    asyncio.run(go())
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
