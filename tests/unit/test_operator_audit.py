"""The operator's acts are in the agents' chain: each with its uid, recorded before it is done,
refused when it cannot be recorded (except a purge), and concurrent with the gate's appends."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.audit.acts import (
    ACTS,
    OperatorAct,
    UnrecordedActError,
    audited,
    record_operator_act,
    sudo_uid,
)
from qubes_mcp.dom0.audit.files import anchor_path
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.verify import verify_log
from qubes_mcp.dom0.config import GateConfig, parse_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.daemon import GateDaemon, operator_call
from qubes_mcp.dom0.errors import ConsentTimeoutError, GateError
from tests.unit.test_gate_consent import ARGS


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_config(tmp_path: Path) -> GateConfig:
    run = tmp_path / "run"
    return parse_config(
        '[[principal]]\nqube = "mcp-control"\n[paths]\n'
        f'audit_log = "{tmp_path}/log/audit.log"\n'
        f'gate_socket = "{run}/gate.sock"\n'
        f'operator_socket = "{run}/op/operator.sock"\n'
    )


def started_log(config: GateConfig) -> Path:
    path = config.paths.audit_log
    with AuditLog(path) as log:
        log.append(principal="operator", op="install", decision="allowed", outcome="ok")
    return path


# --- the one recording function -------------------------------------------------------------


def test_an_act_names_the_operator_by_uid_and_sudo_uid_when_it_differs(tmp_path: Path) -> None:
    path = started_log(make_config(tmp_path))
    record_operator_act(path, "tier", "ai-dev", {"tier": "exec"}, uid=0, claimed_sudo_uid=1000)
    record_operator_act(path, "enrol", "ai-dev", uid=1000, claimed_sudo_uid=1000)
    tier, enrol = lines(path)[1:]
    assert tier["principal"] == "operator:0" and tier["op"] == "operator.tier"
    assert tier["targets"] == ["ai-dev"]
    assert tier["detail"] == {"tier": "exec", "uid": 0, "sudo_uid": 1000}
    assert enrol["principal"] == "operator:1000" and enrol["detail"] == {"uid": 1000}
    assert verify_log(path).ok


def test_the_default_uid_is_the_process_uid(tmp_path: Path) -> None:
    path = started_log(make_config(tmp_path))
    record_operator_act(path, "reload")
    assert lines(path)[-1]["principal"] == f"operator:{os.getuid()}"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"SUDO_UID": ""}, None),
        ({"SUDO_UID": "1000"}, 1000),
        ({"SUDO_UID": "x\n"}, "x\n"),
    ],
)
def test_sudo_uid_is_read_from_the_environment(environ: dict[str, str], expected: object) -> None:
    assert sudo_uid(environ) == expected


def test_only_the_listed_acts_are_recorded(tmp_path: Path) -> None:
    path = started_log(make_config(tmp_path))
    assert {"install", "reload", "enrol", "unenrol", "tier", "approve", "deny"} < ACTS
    with pytest.raises(ValueError, match="not an operator act"):
        record_operator_act(path, "format-disk")


def test_an_act_never_starts_a_chain(tmp_path: Path) -> None:
    path = make_config(tmp_path).paths.audit_log
    with pytest.raises(UnrecordedActError, match="cannot be recorded"):
        OperatorAct(path, "tier", "ai-dev").begin()
    assert not path.exists() and not anchor_path(path).exists()


def test_operator_and_gate_append_concurrently_under_the_logs_lock(tmp_path: Path) -> None:
    """Two writers with their own AuditLog (as the gate's process and the CLI): the flock keeps
    the chain whole."""
    path = started_log(make_config(tmp_path))
    gate_log = AuditLog(path, create=False)

    def gate() -> None:
        for i in range(40):
            gate_log.append(
                principal="mcp-control",
                op="qmcp.Start",
                decision="allowed",
                outcome="ok",
                request_id=f"r{i}",
            )

    thread = threading.Thread(target=gate)
    thread.start()
    for _ in range(40):
        record_operator_act(path, "tier", "ai-dev", {"tier": "read"})
    thread.join()
    result = verify_log(path)
    assert result.ok, result.error
    assert result.entries == 81


# --- the CLI decorator -----------------------------------------------------------------------


def _command(config: GateConfig, name: str, status: int, ran: list[str], **extra: object) -> Any:
    @audited(lambda _args: config, None if name in ("tier", "enrol", "unenrol") else name)
    def command(args: argparse.Namespace) -> int:
        ran.append(name)
        return status

    return command, argparse.Namespace(command=name, **extra)


def test_a_cli_act_is_a_pending_line_then_its_outcome(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path = started_log(config)
    ran: list[str] = []
    command, args = _command(config, "tier", 0, ran, qube="ai-dev", tier="exec", scope="ai")
    assert command(args) == 0 and ran == ["tier"]
    failing, fargs = _command(config, "unenrol", 1, ran, qube="ai-x", scope="ai")
    assert failing(fargs) == 1
    pending, done, fpending, fdone = lines(path)[1:]
    assert (pending["outcome"], done["outcome"]) == ("pending", "ok")
    assert pending["request_id"] == done["request_id"] != ""
    assert pending["detail"]["tier"] == "exec" and pending["detail"]["scope"] == "ai"
    assert (fpending["op"], fdone["outcome"], fdone["code"]) == (
        "operator.unenrol",
        "failed",
        "exit-1",
    )


def test_an_act_that_cannot_be_recorded_is_not_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path)
    path = started_log(config)
    anchor_path(path).unlink()  # the log is broken: nothing can be appended
    ran: list[str] = []
    for name in ("enrol", "uninstall", "install"):
        command, args = _command(config, name, 0, ran, qube="ai-dev", purge=False)
        assert command(args) == 1
    assert ran == []
    assert "cannot be recorded in the audit log" in capsys.readouterr().err


def test_uninstall_purge_goes_ahead_without_a_log(tmp_path: Path) -> None:
    config = make_config(tmp_path)  # no log at all
    ran: list[str] = []
    command, args = _command(config, "uninstall", 0, ran, purge=True)
    assert command(args) == 0 and ran == ["uninstall"]


def test_install_that_starts_the_chain_is_recorded_after_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ran: list[str] = []

    @audited(lambda _args: config, "install")
    def install(args: argparse.Namespace) -> int:
        ran.append("install")
        started_log(config)  # what install does: start the chain
        return 0

    assert install(argparse.Namespace(command="install")) == 0
    ops = [(r["op"], r["outcome"]) for r in lines(config.paths.audit_log)]
    assert ops == [("install", "ok"), ("operator.install", "pending"), ("operator.install", "ok")]


# --- approve / deny through the gate's operator socket ---------------------------------------


async def _answer_through_socket(
    config: GateConfig, answer: str, *, break_log: bool = False
) -> tuple[dict[str, Any], object]:
    daemon = GateDaemon(config, consent=ConsentBroker(30))
    await daemon.start()
    try:
        task = asyncio.create_task(daemon.consent.ask(**ARGS))  # type: ignore[arg-type]
        while not daemon.consent.pending():
            await asyncio.sleep(0.01)
        request = daemon.consent.pending()[0]
        if break_log:
            anchor_path(config.paths.audit_log).unlink()
        reply = await operator_call(
            config.paths.operator_socket,
            {"cmd": answer, "id": request.id, "digest": request.digest, "sudo_uid": 4242},
        )
        if break_log:
            assert daemon.consent.pending() == [request]  # not answered
            task.cancel()
            return reply, None
        try:
            return reply, await task
        except Exception as exc:  # noqa: BLE001 - a denial is an exception here
            return reply, exc
    finally:
        await daemon.close()


@pytest.mark.parametrize("answer", ["approve", "deny"])
def test_approve_and_deny_are_recorded_with_the_peers_uid(tmp_path: Path, answer: str) -> None:
    config = make_config(tmp_path)
    path = started_log(config)
    reply, _ = asyncio.run(_answer_through_socket(config, answer))
    assert reply == {"result": f"{answer}d" if answer == "approve" else "denied"}
    pending, done = lines(path)[1:]
    assert pending["op"] == done["op"] == f"operator.{answer}"
    assert pending["principal"] == f"operator:{os.getuid()}"  # from SO_PEERCRED
    assert pending["detail"]["sudo_uid"] == 4242  # the CLI's claim, beside it
    assert pending["targets"] == ["ai-x"] and done["outcome"] == "ok"
    assert verify_log(path).ok


def test_an_answer_that_cannot_be_recorded_is_not_given(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    started_log(config)
    reply, _ = asyncio.run(_answer_through_socket(config, "approve", break_log=True))
    assert "cannot be recorded in the audit log" in reply["error"]


# --- an answer given in the desktop dialog ----------------------------------------------------


def _dialog_config(tmp_path: Path, exit_code: int) -> GateConfig:
    script = tmp_path / "dialog"
    script.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    script.chmod(0o755)
    base = make_config(tmp_path)
    return dataclasses.replace(
        base, consent=dataclasses.replace(base.consent, dialog=(str(script),))
    )


async def _ask_with_dialog(config: GateConfig, *, break_log: bool = False) -> object:
    daemon = GateDaemon(config)
    if break_log:
        anchor_path(config.paths.audit_log).unlink()
    daemon.consent.timeout = 2
    try:
        return await daemon.consent.ask(**ARGS)  # type: ignore[arg-type]
    except GateError as exc:
        return exc
    finally:
        await daemon.close()


@pytest.mark.parametrize(("exit_code", "act"), [(0, "approve"), (1, "deny")])
def test_a_dialog_answer_is_recorded_before_it_is_given(
    tmp_path: Path, exit_code: int, act: str
) -> None:
    config = _dialog_config(tmp_path, exit_code)
    path = started_log(config)
    outcome = asyncio.run(_ask_with_dialog(config))
    assert isinstance(outcome, str) == (act == "approve")
    record = lines(path)[-1]
    assert record["op"] == f"operator.{act}" and record["targets"] == ["ai-x"]
    assert record["detail"]["answered_by"] == "dialog"
    assert record["principal"] == f"operator:{os.getuid()}"


def test_a_dialog_answer_that_cannot_be_recorded_is_not_given(tmp_path: Path) -> None:
    config = _dialog_config(tmp_path, 0)
    started_log(config)
    outcome = asyncio.run(_ask_with_dialog(config, break_log=True))
    assert isinstance(outcome, ConsentTimeoutError)  # not approved: left to the CLI, unanswered
