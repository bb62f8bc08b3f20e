"""What the agent ran reaches the audit log: the argv escaped and capped by its own bound,
stdin's size and digest, the exit code and the output sizes; ``commands = "hash"`` keeps only
the digest."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qubes_mcp.dom0.audit.clean import (
    ARGV_CAP_MAX,
    LIST_CAP,
    TEXT_CAP,
    Argv,
    clean_argv,
    clean_detail,
)
from qubes_mcp.dom0.audit.record import GENESIS, MAX_LINE_BYTES, build_record, parse_line
from qubes_mcp.dom0.config import AuditSettings, parse_config
from qubes_mcp.dom0.errors import ConfigError
from qubes_mcp.dom0.handlers_write import relay

MINIMAL = '[[principal]]\nqube = "mcp-control"\n'


# --- configuration ------------------------------------------------------------------------


def test_audit_section_defaults_to_argv_with_a_4096_byte_cap() -> None:
    assert parse_config(MINIMAL).audit == AuditSettings("argv", 4096)


def test_audit_section_is_parsed() -> None:
    cfg = parse_config(MINIMAL + '[audit]\ncommands = "hash"\nargv_bytes = 1000\n')
    assert cfg.audit == AuditSettings("hash", 1000)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[audit]\ncommands = "text"\n', 'audit.commands must be "argv" or "hash"'),
        ("[audit]\nargv_bytes = 10\n", "audit.argv_bytes must be between"),
        (f"[audit]\nargv_bytes = {ARGV_CAP_MAX + 1}\n", "audit.argv_bytes must be between"),
        ("[audit]\nargv = 1\n", "unknown key 'argv'"),
        ("audit = 1\n", "[audit] must be a table"),
    ],
)
def test_audit_section_mistakes_are_named(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + MINIMAL if text.startswith("audit =") else MINIMAL + text)
    assert problem in str(info.value)


# --- the argv, escaped and bounded --------------------------------------------------------


def test_every_argument_is_escaped_with_the_logs_one_escaping() -> None:
    hostile = ["sh", "-c", "echo\n{forged}\x1b[2J\u202eevil\\"]
    detail = clean_detail({"argv": Argv(tuple(hostile), 4096)})
    assert detail == {"argv": ["sh", "-c", "echo\\x0a{forged}\\x1b[2J\\u202eevil\\\\"]}


def test_the_argv_is_not_cut_by_the_per_string_or_per_list_caps() -> None:
    argv = ["x" * (TEXT_CAP * 4), *[str(i) for i in range(LIST_CAP * 4)]]
    detail = clean_detail({"argv": Argv(tuple(argv), 4096)})
    assert detail["argv"] == argv
    assert "argv_capped" not in detail


def test_an_argv_above_the_cap_is_cut_and_marked() -> None:
    argv = ("a" * 50, "b" * 30, "c")
    kept, capped = clean_argv(Argv(argv, 60))
    assert capped
    assert kept[0] == "a" * 50
    assert kept[1].startswith("b") and kept[1].endswith("…[+26 chars]")
    assert kept[2] == "…[+1 args]"
    assert clean_detail({"argv": Argv(argv, 60)})["argv_capped"] is True


def test_many_empty_arguments_are_bounded_too() -> None:
    kept, capped = clean_argv(Argv(("",) * 100_000, 300))
    assert capped and len(kept) <= 101 and kept[-1].startswith("…[+")


def test_a_caller_cannot_claim_the_argv_was_capped() -> None:
    detail = clean_detail({"argv": ["ls"], "argv_capped": True})
    assert detail == {"argv": ["ls"], "dropped_keys": ["argv_capped"]}


@pytest.mark.parametrize("char", ["\\", '"', "\x00", "\u202e", "\U0001f600", "é"])
def test_the_largest_cap_never_overflows_a_line(char: str) -> None:
    """At ARGV_CAP_MAX, with the costliest characters, the record keeps its whole detail."""
    argv = Argv((char * (ARGV_CAP_MAX * 2), char), ARGV_CAP_MAX)
    detail: dict[str, object] = {
        "argv": argv,
        "command_sha256": "0" * 64,
        "command_bytes": 1 << 40,
        "stdin_sha256": "0" * 64,
        "stdin_bytes": 1 << 40,
        "path": "\x00" * 1000,
        "reason": "\x00" * 1000,
        "error_class": "\x00" * 1000,
        "consent_id": "\x00" * 1000,
        "plan_id": "\x00" * 1000,
    }
    record = build_record(
        seq=1,
        prev=GENESIS,
        ts="2026-01-01T00:00:00.000000Z",
        principal="\x00" * 100,
        op="\x00" * 100,
        targets=["\x00" * 300] * 20,
        decision="allowed",
        outcome="ok",
        request_id="\x00" * 100,
        detail=detail,
    )
    assert "overflow" not in record.detail
    assert record.detail["argv_capped"] is True
    assert len(record.line()) <= MAX_LINE_BYTES
    assert parse_line(record.line()[:-1]) == record


# --- relay(): what every command records ---------------------------------------------------


def _fake_qrexec_client(tmp_path: Path) -> Path:
    """A ``qrexec-client -d QUBE USER:QUBESRPC qubes.VMExec+WORDS dom0`` that runs the decoded
    words locally (what the qube's agent does with the stock qubes.VMExec)."""
    script = tmp_path / "qrexec-client"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "from qubes_mcp.sim.vm_files.vmexec import decode_args\n"
        "service = sys.argv[3].split(' ')[1]\n"
        "words = decode_args(os.fsencode(service.partition('+')[2]))\n"
        "os.execvp(words[0], words)\n"
    )
    script.chmod(0o755)
    return script


def _ctx(tmp_path: Path, audit: AuditSettings) -> Any:
    config = parse_config(MINIMAL)
    config = dataclasses.replace(
        config,
        paths=dataclasses.replace(config.paths, qrexec_client=_fake_qrexec_client(tmp_path)),
        audit=audit,
    )

    async def qubesd(*_args: object) -> str:  # admin.vm.Start: the qube is "running"
        return ""

    return SimpleNamespace(
        config=config,
        detail={},
        qubesd=qubesd,
        request_id="",
        running_as_read=lambda _qube: False,
    )


def _record(detail: dict[str, object]) -> dict[str, Any]:
    record = build_record(
        seq=1,
        prev=GENESIS,
        ts="2026-01-01T00:00:00.000000Z",
        principal="mcp-control",
        op="qmcp.Run",
        decision="allowed",
        outcome="ok",
        detail=detail,
    )
    loaded: dict[str, Any] = json.loads(record.line())
    return loaded


def test_relay_records_argv_stdin_exit_code_and_output_sizes(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, AuditSettings())
    argv = ["sh", "-c", "cat; echo err >&2; exit 3", "a\nb"]
    result = asyncio.run(relay(ctx, "ai-dev", argv, b"hello", 30))
    assert result.exit_code == 3
    detail = _record(ctx.detail)["detail"]
    assert detail["argv"] == ["sh", "-c", "cat; echo err >&2; exit 3", "a\\x0ab"]
    assert detail["command_sha256"] == hashlib.sha256("\0".join(argv).encode()).hexdigest()
    assert detail["stdin_bytes"] == 5
    assert detail["stdin_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert (detail["exit_code"], detail["stdout_bytes"], detail["stderr_bytes"]) == (3, 5, 4)


def test_relay_caps_the_argv_at_the_configured_size_and_keeps_the_whole_digest(
    tmp_path: Path,
) -> None:
    ctx = _ctx(tmp_path, AuditSettings("argv", 256))
    argv = ["echo", "y" * 1000]
    asyncio.run(relay(ctx, "ai-dev", argv, b"", 30))
    detail = _record(ctx.detail)["detail"]
    assert detail["argv_capped"] is True
    assert len(json.dumps(detail["argv"])) < 256 + 40
    assert detail["command_sha256"] == hashlib.sha256("\0".join(argv).encode()).hexdigest()
    assert detail["command_bytes"] == len("\0".join(argv))


def test_relay_in_hash_mode_records_no_argv(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, AuditSettings("hash", 4096))
    asyncio.run(relay(ctx, "ai-dev", ["echo", "secret-token"], b"", 30))
    line = json.dumps(_record(ctx.detail))
    assert "argv" not in line and "secret-token" not in line
    assert "command_sha256" in line
