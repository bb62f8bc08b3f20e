"""The qrexec transport: every failure of the transport looks exactly like the gate's not-found.

The fake ``qrexec-client-vm`` executables here are real processes written by the test (exit
126, garbage, silence, sleeping past the timeout …), not mocks: what is tested is how the server
treats the process, its exit code, its output and its lifetime.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.dom0.errors import CODES
from qubes_mcp.server import transport as tr
from qubes_mcp.server.gateway import Gateway
from qubes_mcp.server.table import load_table
from qubes_mcp.server.transport import GateRefusalError, QrexecTransport, Timeouts

NOT_FOUND = ("not-found", "no such qube, or not yours")
OK_REPLY = '{"ok":true,"result":{"qube":"ai-dev","state":"Running"}}'


def fake_client(tmp_path: Path, body: str) -> Path:
    """A fake qrexec-client-vm: records argv and stdin, then runs ``body`` (sh)."""
    exe = tmp_path / "qrexec-client-vm"
    exe.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\ncat > "{tmp_path}/stdin"\n{body}\n'
    )
    exe.chmod(0o755)
    return exe


def call(exe: Path, target: str = "ai-dev", timeout: float = 10.0) -> dict[str, object]:
    op = load_table().op("qube.start")
    return asyncio.run(
        tr.invoke(
            QrexecTransport(str(exe)),
            op,
            target,
            {},
            Timeouts(short=timeout, long=timeout, margin=0, consent=0),
        )
    )


def refusal(exe: Path, **kwargs: object) -> tuple[str, str]:
    with pytest.raises(GateRefusalError) as info:
        call(exe, **kwargs)  # type: ignore[arg-type]
    return info.value.code, info.value.message


def test_a_gate_reply_is_returned_and_the_call_is_addressed_to_the_qube(tmp_path: Path) -> None:
    exe = fake_client(tmp_path, f"echo '{OK_REPLY}'")
    assert call(exe) == {"qube": "ai-dev", "state": "Running"}
    assert (tmp_path / "argv").read_text().split() == ["ai-dev", "qmcp.Start"]
    assert json.loads((tmp_path / "stdin").read_text()) == {}


def test_a_global_call_is_addressed_to_adminvm_with_its_payload(tmp_path: Path) -> None:
    exe = fake_client(tmp_path, 'echo \'{"ok":true,"result":{"seconds":1,"events":[]}}\'')
    gw = Gateway(QrexecTransport(str(exe)))
    asyncio.run(gw.call(None, "events.watch", "ai-dev", {"seconds": 1}))
    assert (tmp_path / "argv").read_text().split() == ["@adminvm", "qmcp.Events"]
    assert json.loads((tmp_path / "stdin").read_text()) == {"seconds": 1}


def test_the_gates_refusal_is_relayed_as_is(tmp_path: Path) -> None:
    reply = '{"ok":false,"error":{"code":"insufficient-tier","message":"needs exec on ai-notes"}}'
    exe = fake_client(tmp_path, f"echo '{reply}'")
    assert refusal(exe) == ("insufficient-tier", "needs exec on ai-notes")


@pytest.mark.parametrize(
    "body",
    [
        "echo 'Request refused' >&2; exit 126",
        "echo garbage",
        "true",
        f"echo '{OK_REPLY}'; exit 1",
        "exit 127",
        "kill -9 $$",
        "echo '[1,2,3]'",
        'echo \'{"ok":true,"result":[]}\'',
        'echo \'{"ok":false,"error":{"code":"pwned","message":"x"}}\'',
        'echo \'{"ok":false,"error":{"code":"failed","message":1}}\'',
        'printf \'{"ok":false,"error":{"code":"failed","message":"a\\\\u001b[31mb"}}\'',
        "printf '\\377\\376'",
    ],
    ids=[
        "policy-refused-126",
        "garbage-stdout",
        "empty-stdout",
        "good-json-but-nonzero-exit",
        "client-not-found-127",
        "client-killed",
        "json-not-an-object",
        "result-not-an-object",
        "unknown-error-code",
        "message-not-a-string",
        "terminal-escape-in-message",
        "not-utf8",
    ],
)
def test_transport_failures_are_the_gates_not_found(tmp_path: Path, body: str) -> None:
    assert refusal(fake_client(tmp_path, body)) == NOT_FOUND


UNAVAILABLE = (tr.UNAVAILABLE_CODE, tr.UNAVAILABLE_MESSAGE)


@pytest.mark.parametrize("target", ["ai-dev", "@adminvm"])
def test_a_missing_client_is_unavailable_for_every_target(tmp_path: Path, target: str) -> None:
    # no qrexec-client-vm reaches nothing at all: it says nothing about any qube (issue 9)
    assert refusal(tmp_path / "absent", target=target) == UNAVAILABLE
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    assert refusal(tmp_path / "not-executable", target=target) == UNAVAILABLE


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("exit 127", UNAVAILABLE),  # no qmcp.* service in dom0, or the gate is not listening
        ("echo 'qrexec-agent not running' >&2; exit 1", UNAVAILABLE),
        ("kill -9 $$", UNAVAILABLE),
        ("echo 'Request refused' >&2; exit 126", NOT_FOUND),  # a policy refusal stays one
        ("echo garbage", NOT_FOUND),
    ],
    ids=["service-missing-127", "qrexec-error", "client-killed", "policy-refused", "garbage"],
)
def test_a_broken_transport_to_adminvm_is_unavailable(
    tmp_path: Path, body: str, expected: tuple[str, str]
) -> None:
    exe = fake_client(tmp_path, body)
    assert refusal(exe, target="@adminvm") == expected
    # the same failure on a call to a qube is the existence-hiding not-found
    assert refusal(exe, target="ai-dev") == NOT_FOUND


def test_an_oversized_reply_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tr, "MAX_REPLY_BYTES", 4096)
    assert refusal(fake_client(tmp_path, "head -c 100000 /dev/zero")) == NOT_FOUND


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init is dead too


def _wait_until(condition: object, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def test_a_client_that_hangs_is_killed_with_its_children_at_the_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    exe = fake_client(tmp_path, f'sleep 60 & echo $! > "{pidfile}"; wait')
    assert refusal(exe, timeout=1.0) == NOT_FOUND
    assert _wait_until(lambda: _dead(int(pidfile.read_text())))


def test_cancelling_the_tool_call_kills_the_client(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    exe = fake_client(tmp_path, f'sleep 60 & echo $! > "{pidfile}"; wait')
    gw = Gateway(QrexecTransport(str(exe)))

    async def scenario() -> None:
        task = asyncio.create_task(gw.call(None, "qube.start", "ai-dev"))
        for _ in range(500):  # bounded wait for the client to be running
            if pidfile.exists() and pidfile.read_text().strip():
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _wait_until(lambda: _dead(int(pidfile.read_text())))


@pytest.mark.parametrize(
    "target",
    ["-h", "--help", "dom0\n", "ai dev", "", "a" * 32, "../x", "@dispvm", "$adminvm", "1qube"],
    ids=[
        "option-injection",
        "long-option",
        "trailing-newline",
        "space",
        "empty",
        "too-long",
        "path",
        "dispvm-keyword",
        "dollar-keyword",
        "digit-first",
    ],
)
def test_malformed_targets_never_reach_the_client(tmp_path: Path, target: str) -> None:
    exe = fake_client(tmp_path, f"echo '{OK_REPLY}'")
    assert refusal(exe, target=target) == NOT_FOUND
    assert not (tmp_path / "argv").exists()


def test_timeouts_let_dom0_answer_first() -> None:
    t = Timeouts(consent=120, margin=30)
    table = load_table()
    run = table.op("qube.run")
    # a command's own timeout, plus the operator's window, plus the margin
    assert t.for_call(run, {"timeout": 3600}) == 3600 + 120 + 30
    assert t.for_call(table.op("events.watch"), {"seconds": 900}) == 900 + 30
    assert t.for_call(table.op("qube.remove"), {}) >= t.consent + t.margin
    assert t.for_call(table.op("qube.info"), {}) < t.for_call(table.op("qube.pause"), {})


@given(st.binary(max_size=512))
def test_decode_reply_never_fails_other_than_by_refusing(data: bytes) -> None:
    try:
        result = tr.decode_reply(data)
    except GateRefusalError as exc:
        assert exc.code in CODES
    else:
        assert isinstance(result, dict)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.fixed_dictionaries({"ok": st.booleans() | JSON, "error": JSON, "result": JSON}))
def test_only_well_formed_replies_get_through(reply: dict[str, object]) -> None:
    data = json.dumps(reply).encode()
    try:
        result = tr.decode_reply(data)
    except GateRefusalError as exc:
        assert exc.code in CODES and exc.message.isprintable()
    else:
        assert reply["ok"] is True and result == reply["result"]


def test_not_found_bytes_equal_the_gates(tmp_path: Path) -> None:
    gate = '{"ok":false,"error":{"code":"not-found","message":"no such qube, or not yours"}}'
    from_gate = refusal(fake_client(tmp_path, f"echo '{gate}'"))
    from_policy = refusal(fake_client(tmp_path, "exit 126"))
    assert from_gate == from_policy == NOT_FOUND
    assert os.path.exists(tmp_path / "argv")
