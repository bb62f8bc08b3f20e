"""The qubesd calls of one ``qmcp.Run`` (issue 8: Run within 15 ms of VMShell): the facts a
command needs, no volume sizes, and no ``admin.vm.Start`` when those facts read the qube as
Running; a halted qube is still started first, and the operations that show or count sizes
still read them.

The gate runs in-process on a real emulated qubesd (its real code, every call recorded); the
qube end of the line is a stand-in ``qrexec-client`` that only exits 0.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.facts import Facts, QubeFacts
from qubes_mcp.dom0.gate import Gate, Request
from tests.enrolment_helpers import migrate_tagged
from tests.gate_fixtures import CONFIG_TEXT
from tests.qubesd_fixtures import Qubesd

TARGET = "ai-dev"
FACTS = ["admin.vm.tag.List", "admin.vm.List", "admin.vm.property.GetAll"]


class RecordingAdmin(AdminClient):
    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path)
        self.calls: list[tuple[str, str]] = []

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        self.calls.append((dest, method))
        return await super().call(dest, method, arg, payload)


def _gate(qubesd: Qubesd, tmp_path: Path) -> tuple[Gate, RecordingAdmin]:
    client = tmp_path / "qrexec-client"
    client.write_text("#!/bin/sh\nexit 0\n")
    client.chmod(0o755)
    config = parse_config(
        CONFIG_TEXT + f'\n[paths]\nqubesd_socket = "{qubesd.paths.qubesd_sock}"\n'
        f'state_dir = "{tmp_path}/state"\npolicy_dir = "{tmp_path}/policy.d"\n'
        f'qrexec_client = "{client}"\n'
    )
    migrate_tagged(config)
    admin = RecordingAdmin(qubesd.paths.qubesd_sock)
    gate = Gate(config, AuditLog(tmp_path / "audit" / "audit.log"), ConsentBroker(5), admin)
    asyncio.run(gate.handle(Request("qmcp.List", "mcp-control", None, b"")))  # reconcile once
    return gate, admin


def _handle(gate: Gate, admin: RecordingAdmin, service: str, payload: Any) -> dict[str, Any]:
    admin.calls.clear()
    body = json.dumps(payload).encode() if payload is not None else b""
    reply: dict[str, Any] = asyncio.run(gate.handle(Request(service, "mcp-control", TARGET, body)))
    assert reply["ok"] is True, reply
    return reply["result"]


def _power(qubesd: Qubesd) -> str:
    return str(qubesd.on_loop(lambda: qubesd.app.domains[TARGET].power))


def test_run_in_a_running_qube_reads_its_facts_and_nothing_else(
    qubesd: Qubesd, tmp_path: Path
) -> None:
    gate, admin = _gate(qubesd, tmp_path)
    assert qubesd.call(TARGET, "admin.vm.Start") == b"0\0"
    result = _handle(gate, admin, "qmcp.Run", {"command": ["true"]})
    assert result["exit_code"] == 0
    assert admin.calls == [(TARGET, m) for m in FACTS]


def test_run_in_a_halted_qube_starts_it_first(qubesd: Qubesd, tmp_path: Path) -> None:
    gate, admin = _gate(qubesd, tmp_path)
    assert _power(qubesd) == "Halted"
    _handle(gate, admin, "qmcp.Run", {"command": ["true"]})
    assert admin.calls == [(TARGET, m) for m in [*FACTS, "admin.vm.Start"]]
    assert _power(qubesd) == "Running"


def test_a_paused_qube_is_not_taken_for_running(qubesd: Qubesd, tmp_path: Path) -> None:
    gate, admin = _gate(qubesd, tmp_path)
    assert qubesd.call(TARGET, "admin.vm.Start") == b"0\0"
    assert qubesd.call(TARGET, "admin.vm.Pause") == b"0\0"
    _handle(gate, admin, "qmcp.Run", {"command": ["true"]})
    assert admin.calls[-1] == (TARGET, "admin.vm.Start")  # as before: R4.3's Start decides


def test_info_still_reads_the_volume_sizes(qubesd: Qubesd, tmp_path: Path) -> None:
    gate, admin = _gate(qubesd, tmp_path)
    result = _handle(gate, admin, "qmcp.Info", None)
    assert (TARGET, "admin.vm.volume.Info") in admin.calls
    assert result["volumes"]["private"]["size"] > 0


def _ctx(state: str) -> Context:
    facts = Facts(
        qubes={TARGET: QubeFacts(name=TARGET, klass="AppVM", state=state, tags=frozenset())}
    )
    return Context(None, None, None, None, None, facts)  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["Halted", "Paused", "Transient", "Suspended", ""])
def test_only_a_qube_read_as_running_skips_the_start(state: str) -> None:
    assert _ctx(state).running_as_read(TARGET) is False


def test_the_read_vouches_for_the_first_command_only() -> None:
    ctx = _ctx("Running")
    # a second command of the same request may follow one that stopped the qube
    assert [ctx.running_as_read(TARGET), ctx.running_as_read(TARGET)] == [True, False]
    assert ctx.running_as_read("ai-other") is False  # not read at all
