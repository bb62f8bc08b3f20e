"""Issue 9 §1: a configuration change takes effect when the gate reloads, or the gate says it
has not. One swap point (``GateDaemon.use``); a request keeps the configuration it started
under; a configuration that does not load, or moves a path, leaves the running one in place.

The gate runs in-process against an emulated qubesd; the handler of ``qube.start`` is replaced
by a spy so the test sees the configuration a request acts under, without starting anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0 import gate as gate_module
from qubes_mcp.dom0.admission import Slots
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import GateConfig, config_digest, load_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.daemon import GateDaemon, operator_call
from qubes_mcp.dom0.gate import Request
from tests.enrolment_helpers import migrate_tagged
from tests.gate_fixtures import CONFIG_TEXT
from tests.qubesd_fixtures import Qubesd


def config_text(qubesd: Qubesd, tmp_path: Path, *, edit: dict[str, str] | None = None) -> str:
    text = CONFIG_TEXT
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    return text + (
        f'\n[paths]\nqubesd_socket = "{qubesd.paths.qubesd_sock}"\n'
        f'state_dir = "{tmp_path}/state"\npolicy_dir = "{tmp_path}/policy.d"\n'
        f'audit_log = "{tmp_path}/log/audit.log"\n'
        f'gate_socket = "{tmp_path}/run/gate.sock"\n'
        f'operator_socket = "{tmp_path}/run/op/operator.sock"\n'
    )


def daemon_for(qubesd: Qubesd, tmp_path: Path) -> tuple[GateDaemon, Path]:
    path = tmp_path / "config.toml"
    path.write_text(config_text(qubesd, tmp_path))
    config = load_config(path)
    migrate_tagged(config)
    with AuditLog(config.paths.audit_log) as log:
        log.append(principal="operator", op="install", decision="allowed", outcome="ok")
    return GateDaemon(config, consent=ConsentBroker(30), config_path=path), path


def records(config: GateConfig) -> list[dict[str, Any]]:
    return [json.loads(x) for x in config.paths.audit_log.read_text().splitlines()]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[GateConfig]:
    """The configuration each ``qube.start`` acted under, in order."""
    acted: list[GateConfig] = []

    async def spy(ctx: Context) -> dict[str, Any]:
        acted.append(ctx.config)
        return {"started": ctx.target}

    monkeypatch.setitem(gate_module.HANDLERS, "qube.start", spy)
    return acted


def start(target: str) -> Request:
    return Request("qmcp.Start", "mcp-control", target, b"")


def test_reload_puts_every_derived_setting_in_place(qubesd: Qubesd, tmp_path: Path) -> None:
    daemon, path = daemon_for(qubesd, tmp_path)
    old = daemon.config
    path.write_text(
        config_text(
            qubesd,
            tmp_path,
            edit={
                "max_qubes = 12": "max_qubes = 3",
                "timeout = 30": "timeout = 45\noperations = ['qube.pause']",
                'default_tier = "read"': 'default_tier = "exec"',
                "[budget]": "[limits]\nrate = 7\nburst = 9\nconcurrent_requests = 2\n"
                "open_requests = 5\nrequest_bytes = 4096\n\n[budget]",
            },
        )
    )

    async def go() -> dict[str, Any]:
        reply = await daemon.reload(uid=os.getuid())
        budget = await daemon.gate.handle(Request("qmcp.Budget", "mcp-control", None, b""))
        return {"reply": reply, "budget": budget}

    out = asyncio.run(go())
    new = daemon.config
    assert out["reply"] == {
        "result": "reloaded",
        "running": new.digest,
        "previous": old.digest,
        "policy_current": True,  # none of these settings is in the qrexec policy
    }
    assert new.digest == config_digest(path.read_bytes()) != old.digest
    assert out["budget"]["result"]["max_qubes"] == 3
    # everything that was cached at start follows the one swap
    assert daemon.gate.config is new
    assert daemon.gate.limiter._limits is new.limits
    assert daemon.consent.timeout == 45
    share = daemon.admission.share("mcp-control")
    assert (share.open_max, share.acting.size) == (5, 2)
    assert new.default_tier.word == "exec" and "qube.pause" in new.consent.operations
    pending, done = records(new)[-2:]
    assert (pending["op"], pending["outcome"], done["outcome"]) == (
        "operator.reload",
        "pending",
        "ok",
    )
    assert done["detail"]["config_sha256"] == new.digest


def test_a_request_waiting_for_consent_ends_under_the_configuration_it_started_with(
    qubesd: Qubesd, tmp_path: Path, seen: list[GateConfig]
) -> None:
    """ai-dev is guarded in A, not in B: the request that waited for consent across the
    reload acts under A; one that arrives after it acts under B, without being asked."""
    daemon, path = daemon_for(qubesd, tmp_path)
    path.write_text(config_text(qubesd, tmp_path, edit={'["ai-precious"]': '["ai-dev"]'}))
    assert asyncio.run(daemon.reload(uid=os.getuid()))["result"] == "reloaded"
    a = daemon.config
    path.write_text(config_text(qubesd, tmp_path, edit={"max_qubes = 12": "max_qubes = 4"}))

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        waiting = asyncio.create_task(daemon.gate.handle(start("ai-dev")))
        async with asyncio.timeout(10):
            while not daemon.consent.pending():
                await asyncio.sleep(0.01)
        reloaded = await daemon.reload(uid=os.getuid())
        after = await daemon.gate.handle(start("ai-dev"))  # under B: not guarded, not asked
        request = daemon.consent.pending()[0]
        daemon.consent.answer(request.id, approve=True, digest=request.digest)
        return reloaded, after, await waiting

    reloaded, after, first = asyncio.run(go())
    b = daemon.config
    assert reloaded["result"] == "reloaded" and b is not a and b.budget.max_qubes == 4
    assert after["ok"] and first["ok"], (after, first)
    assert seen == [b, a]  # the later request acted first, under B; the waiting one under A
    outcomes = [
        (r["detail"].get("consent"), r["outcome"])
        for r in records(b)
        if r["op"] == "qube.start" and r["outcome"] == "ok"
    ]
    assert outcomes == [(None, "ok"), ("approved", "ok")]


def test_a_configuration_that_does_not_load_keeps_the_running_one(
    qubesd: Qubesd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon, path = daemon_for(qubesd, tmp_path)
    old = daemon.config
    path.write_text(config_text(qubesd, tmp_path) + "\n[budget]\nmax_qubes = 'many'\n")
    with caplog.at_level(logging.ERROR, logger="qubes_mcp.gate"):
        reply = asyncio.run(daemon.reload(uid=os.getuid()))
    assert daemon.config is old and daemon.gate.config is old
    assert "reload refused: the configuration does not load" in reply["error"]
    assert f"keeps running the configuration it had (sha256 {old.digest})" in reply["error"]
    assert reply["running"] == old.digest
    assert "RELOAD REFUSED" in caplog.text
    done = records(old)[-1]
    assert (done["op"], done["outcome"]) == ("operator.reload", "failed")
    assert done["detail"]["config_sha256"] == config_digest(path.read_bytes())


def test_reload_says_when_the_installed_policy_lags_the_configuration(
    qubesd: Qubesd, tmp_path: Path
) -> None:
    """The egress qube is in the qrexec policy, which ``install`` writes, not a reload."""
    daemon, path = daemon_for(qubesd, tmp_path)
    path.write_text(config_text(qubesd, tmp_path, edit={'"ai-egress"': '"ai-web"'}))
    reply = asyncio.run(daemon.reload(uid=os.getuid()))
    assert reply["result"] == "reloaded" and reply["policy_current"] is False


def test_a_path_cannot_change_while_the_gate_runs(qubesd: Qubesd, tmp_path: Path) -> None:
    daemon, path = daemon_for(qubesd, tmp_path)
    old = daemon.config
    moved = config_text(qubesd, tmp_path).replace("/log/audit.log", "/elsewhere/audit.log")
    path.write_text(moved.replace("max_qubes = 12", "max_qubes = 2"))
    reply = asyncio.run(daemon.reload(uid=os.getuid()))
    assert "paths.audit_log cannot change while the gate runs" in reply["error"]
    assert daemon.config is old and daemon.config.budget.max_qubes == 12


def test_reload_and_status_on_the_operator_socket(qubesd: Qubesd, tmp_path: Path) -> None:
    """``reload`` is an act of the socket peer's uid; ``status`` gives the running digest and
    the ids of the requests waiting for consent."""
    daemon, path = daemon_for(qubesd, tmp_path)
    socket = daemon.config.paths.operator_socket

    async def go() -> tuple[dict[str, Any], dict[str, Any], str]:
        await daemon.start()
        try:
            path.write_text(config_text(qubesd, tmp_path, edit={'["ai-precious"]': '["ai-dev"]'}))
            reply = await operator_call(socket, {"cmd": "reload", "sudo_uid": 4242})
            waiting = asyncio.create_task(daemon.gate.handle(start("ai-dev")))
            async with asyncio.timeout(10):
                while not daemon.consent.pending():
                    await asyncio.sleep(0.01)
            status = await operator_call(socket, {"cmd": "status"})
            waiting.cancel()
            return reply, status, daemon.consent.pending()[0].id
        finally:
            await daemon.close()

    reply, status, waiting_id = asyncio.run(go())
    assert reply["result"] == "reloaded"
    assert status["config_sha256"] == config_digest(path.read_bytes())
    assert status["pending"] == [waiting_id]
    done = [r for r in records(daemon.config) if r["op"] == "operator.reload"][-1]
    assert done["principal"] == f"operator:{os.getuid()}"
    assert done["detail"]["sudo_uid"] == 4242


def test_slots_take_a_new_size_as_they_are_released() -> None:
    async def go() -> list[int]:
        slots = Slots(2)
        await slots.acquire()
        await slots.acquire()
        third = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.resize(1)
        slots.release()  # 1 in use, size 1: the waiter still waits
        await asyncio.sleep(0)
        steps = [slots.used, int(third.done())]
        slots.release()  # 0 in use: the waiter is served
        await asyncio.sleep(0)
        steps += [slots.used, int(third.done())]
        slots.resize(3)
        return steps

    assert asyncio.run(go()) == [1, 0, 1, 1]
