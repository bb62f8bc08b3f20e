"""``qubes-mcp serve --check``: one ``qmcp.List`` call to ``@adminvm`` through the configured
transport, and a precise line for each way it can fail. The fake ``qrexec-client-vm`` files
are real executables that record their argv and stdin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qubes_mcp import cli

LIST_REPLY = json.dumps(
    {
        "ok": True,
        "result": {
            "principal": "mcp-control",
            "qubes": [{"name": "ai-dev"}, {"name": "ai-egress"}],
            "dump_sinks": ["ai-notes"],
        },
    }
)


def fake_client(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "qrexec-client-vm"
    exe.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/argv"\ncat > "{tmp_path}/stdin"\n{body}\n'
    )
    exe.chmod(0o755)
    return exe


def run(exe: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["serve", "--check", "--qrexec-client", str(exe)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_ok_makes_one_list_call_to_adminvm_and_reports_the_scope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run(fake_client(tmp_path, f"echo '{LIST_REPLY}'"), capsys)
    assert code == 0
    assert (tmp_path / "argv").read_text().split() == ["@adminvm", "qmcp.List"]
    assert json.loads((tmp_path / "stdin").read_text()) == {}
    assert 'OK: the gate answers; principal "mcp-control" has 2 qube(s) in scope' in text
    assert "1 dump sink(s)" in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("echo 'Request refused' >&2; exit 126", "qrexec policy in dom0 refused qmcp.List"),
        ("exit 127", "dom0 has no qmcp.List service, or the gate is not running (exit 127)"),
        (
            "echo 'Failed to connect to qrexec agent' >&2; exit 1",
            "qrexec failed (exit 1) (Failed to connect to qrexec agent)",
        ),
        ("echo garbage", "dom0 answered qmcp.List, but not with the gate's reply"),
        (
            'echo \'{"ok":false,"error":{"code":"unavailable","message":"gate down"}}\'',
            "the gate refused: unavailable: gate down",
        ),
        ('echo \'{"ok":true,"result":{}}\'', "lacks its principal or qubes"),
    ],
    ids=["policy-refused", "no-service", "qrexec-error", "garbage", "refusal", "bad-result"],
)
def test_each_failure_is_named_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, expected: str
) -> None:
    code, text = run(fake_client(tmp_path, body), capsys)
    assert code == 1
    assert expected in text, text


def test_no_qrexec_client_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(tmp_path / "qrexec-client-vm", capsys)
    assert code == 1
    assert "cannot reach dom0: cannot run" in text and "No such file or directory" in text


def test_a_stopped_emulator_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--check", "--sim", str(tmp_path)])
    text = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach dom0: the emulator at {tmp_path} is not running" in text
