"""The gate never acts on what it cannot record, and never claims what it did not do.

Issue 11 §3: an outcome line that cannot be written must not crash the request (every path
answers), and the gate then stops taking state-changing requests until it is written, saying
why in ``status``; reads go on. A full disk refuses before acting and leaves no pending line;
space returning is enough to resume. Issue 7 §6: a flood of refused requests can neither
rotate unexported records away nor flood the log, and is rate limited per principal.

A real gate pipeline against our emulated qubesd (in process), with its audit log on a real
tmpfs where the test needs a full file system.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit.files import archives
from qubes_mcp.dom0.audit.log import AuditError, AuditLog
from qubes_mcp.dom0.audit.record import MAX_LINE_BYTES, parse_line
from qubes_mcp.dom0.audit.verify import verify_log
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.gate import Gate, Request
from qubes_mcp.dom0.operator.audit_cli import audit_checkpoint_main
from tests.enrolment_helpers import in_process_config
from tests.fs_faults import fill, small_tmpfs
from tests.qubesd_fixtures import Qubesd

NO_LIMITS = "rate = 100000\nburst = 1000000\nrefused_rate = 100000\nrefused_burst = 1000000\n"


def make_gate(qubesd: Qubesd, audit: AuditLog, limits: str = NO_LIMITS) -> Gate:
    config = in_process_config(qubesd.paths.qubesd_sock, qubesd.paths.root, f"\n[limits]\n{limits}")
    return Gate(config, audit, ConsentBroker(5), AdminClient(qubesd.paths.qubesd_sock))


def set_label(label: str, qube: str = "ai-build", source: str = "mcp-control") -> Request:
    payload = json.dumps({"property": "label", "value": label}).encode()
    return Request("qmcp.SetProperty", source, qube, payload)


def info(qube: str = "ai-build", source: str = "mcp-control") -> Request:
    return Request("qmcp.Info", source, qube, b"")


def label_of(qubesd: Qubesd, qube: str = "ai-build") -> str:
    reply = qubesd.call(qube, "admin.vm.property.Get", "label")
    assert reply.startswith(b"0\0"), reply
    return reply.rsplit(b" ", 1)[-1].decode()


def records(path: Path) -> list[Any]:
    files = [p for _s, p in archives(path)] + [path]
    return [parse_line(line) for f in files for line in f.read_bytes().splitlines()]


def one_outcome_each(path: Path) -> None:
    """Every pending line has exactly one outcome line after it (same request id)."""
    pending = [r.request_id for r in records(path) if r.outcome == "pending"]
    closing = [
        r.request_id for r in records(path) if r.request_id in pending and r.outcome != "pending"
    ]
    assert sorted(pending) == sorted(closing)


# --- the outcome line ------------------------------------------------------------------------


def test_an_unrecordable_outcome_answers_stops_writes_and_resumes(
    qubesd: Qubesd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit" / "audit.log"
    audit = AuditLog(path)
    gate = make_gate(qubesd, audit)
    broken = {"on": True}
    real_append = audit.append

    def append(**fields: Any) -> Any:
        if broken["on"] and fields["outcome"] == "ok":
            raise AuditError("simulated: the disk failed under the outcome line")
        return real_append(**fields)

    monkeypatch.setattr(audit, "append", append)

    async def scenario() -> list[dict[str, Any]]:
        replies = [await gate.handle(set_label("blue"))]  # acts; outcome not recordable
        replies.append(await gate.handle(set_label("green")))  # refused: the gate stopped
        replies.append(await gate.handle(info()))  # reads go on
        status = gate.status()
        broken["on"] = False
        replies.append(await gate.handle(set_label("yellow")))  # owed line first, then this
        return [*replies, status, gate.status()]

    first, stopped, read, resumed, halted_status, later_status = asyncio.run(scenario())
    assert first["ok"] is True  # it was done, and the agent is told so
    assert stopped["ok"] is False and stopped["error"]["code"] == "unavailable"
    assert read["ok"] is True
    assert halted_status["serving"] == "reads only"
    assert "could not be recorded" in halted_status["halted"]
    assert "disk failed" in halted_status["halted"]
    assert resumed["ok"] is True
    assert later_status["halted"] is None and later_status["unrecorded_outcomes"] == 0
    assert label_of(qubesd) == "yellow"  # green was never set
    log = records(path)
    late = [r for r in log if r.detail.get("recorded_late")]
    assert len(late) == 1 and late[0].outcome == "ok"
    assert any(r.code == "unavailable" and r.outcome == "not-run" for r in log)
    one_outcome_each(path)
    assert verify_log(path).ok


# --- a full disk -------------------------------------------------------------------------------


def test_a_full_disk_refuses_before_acting_and_resumes_when_space_returns(
    qubesd: Qubesd, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        path = fs / "audit" / "audit.log"
        gate = make_gate(qubesd, AuditLog(path))

        async def go(request: Request) -> dict[str, Any]:
            return await gate.handle(request)

        assert asyncio.run(go(set_label("blue")))["ok"] is True
        filler = fill(fs)
        before = path.read_bytes()
        for label in ("green", "purple", "orange"):
            reply = asyncio.run(go(set_label(label)))
            assert reply == {
                "ok": False,
                "error": {"code": "unavailable", "message": "qubes-mcp gate is unavailable"},
            }
        assert label_of(qubesd) == "blue"  # nothing was done
        assert path.read_bytes() == before  # and no pending line claims it was
        assert "No space left" in (gate.status()["audit_problem"] or "")
        assert verify_log(path).ok
        filler.unlink()
        assert asyncio.run(go(set_label("yellow")))["ok"] is True  # no recover needed
        assert label_of(qubesd) == "yellow"
        assert gate.status()["audit_problem"] is None
        one_outcome_each(path)
        assert verify_log(path).ok


# --- floods ---------------------------------------------------------------------------------


def test_a_flood_of_refusals_cannot_rotate_unexported_records_away(
    qubesd: Qubesd, tmp_path: Path
) -> None:
    """The 490,000-refusal wash of issue 7 §6, at small scale: keep=2 files of 64 KiB, no rate
    limit and no summarising, so only retention stands between the flood and the evidence."""
    path = tmp_path / "audit" / "audit.log"
    gate = make_gate(qubesd, AuditLog(path, max_bytes=2 * MAX_LINE_BYTES, keep=2))
    gate.refusals.full = 10**9  # every refusal in full: the worst case for the log

    async def flood() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        assert (await gate.handle(set_label("blue")))["ok"] is True  # the evidence
        replies = [await gate.handle(set_label("red", qube="vault")) for _ in range(1500)]
        return replies, await gate.handle(set_label("green"))

    replies, blocked = asyncio.run(flood())
    assert all(r["error"]["code"] == "not-found" for r in replies)  # still answered
    assert blocked["error"]["code"] == "unavailable"  # fail closed, not forget
    assert label_of(qubesd) == "blue"
    assert "not yet exported" in (gate.status()["audit_problem"] or "")
    result = verify_log(path)
    assert result.ok, result.error
    first = records(path)[0]
    assert first.seq == 1 and first.op == "property.set"  # the evidence is still there
    # the operator backs up and records it; the gate takes requests again
    assert audit_checkpoint_main(path, __import__("io").StringIO()) == 0
    assert asyncio.run(gate.handle(set_label("green")))["ok"] is True
    assert verify_log(path).ok


def test_a_flood_is_rate_limited_and_summarised_and_every_refusal_is_counted(
    qubesd: Qubesd, tmp_path: Path
) -> None:
    path = tmp_path / "audit" / "audit.log"
    gate = make_gate(
        qubesd, AuditLog(path), "rate = 20\nburst = 100\nrefused_rate = 5\nrefused_burst = 50\n"
    )
    total = 3000

    async def flood() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        replies = [await gate.handle(set_label("red", qube="vault")) for _ in range(total)]
        other = await gate.handle(info("ai-notes", source="auditor"))
        await gate.flush()
        return replies, other

    replies, other = asyncio.run(flood())
    codes = [r["error"]["code"] for r in replies]
    assert codes[:50] == ["not-found"] * 50  # the burst
    assert codes.count("rate-limited") >= total - 60  # then the refusal budget is spent
    assert other["ok"] is True  # another principal is not limited by this one's flood
    log = records(path)
    assert len(log) <= 20  # a handful of lines, not 3000
    full = [r for r in log if r.request_id != "refusals-summary"]
    summaries = [r for r in log if r.request_id == "refusals-summary"]
    assert summaries and all(r.detail["summary"] == "refusals" for r in summaries)
    counted = sum(int(r.detail["count"]) for r in summaries)
    assert len(full) + counted == total  # every refused request is accounted for
    assert verify_log(path).ok
