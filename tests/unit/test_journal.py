"""The audit log as the intent journal: which requests have no outcome (dom0/journal.py), what
``audit verify`` says about them, and where a broken configuration's gate still listens."""

from __future__ import annotations

import io
from pathlib import Path

from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.verify import audit_verify_main, verify_log
from qubes_mcp.dom0.broken_config import fallback_paths, load_for_gate
from qubes_mcp.dom0.journal import SWEEP_OP, scan_tail


def _line(log: AuditLog, rid: str, outcome: str, **detail: object) -> None:
    log.append(
        principal="mcp-control",
        op="qube.create",
        decision="allowed",
        outcome=outcome,
        targets=["ai-debian", f"ai-{rid}"],
        request_id=rid,
        detail=detail,
    )


def _open(path: Path, budget: int = 1 << 20) -> list[str]:
    return [r.request_id for r in scan_tail(path, budget).open()]


def test_a_request_is_open_until_its_outcome(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    _line(log, "a1", "pending", consent="asked")
    _line(log, "b2", "pending")
    _line(log, "a1", "pending", consent="approved")
    _line(log, "c3", "pending")
    _line(log, "c3", "ok")
    _line(log, "b2", "failed", rolled_back=False)
    journal = scan_tail(log.path)
    assert [(r.request_id, r.detail.get("consent")) for r in journal.open()] == [
        ("a1", "approved")  # the last pending line of the request is what counts
    ]
    assert [r.request_id for r in journal.unrolled()] == ["b2"]
    log.append(
        principal="dom0",
        op=SWEEP_OP,
        decision="allowed",
        outcome="ok",
        targets=["ai-b2"],
        request_id="b2",
    )
    assert scan_tail(log.path).unrolled() == []  # swept once, never again


def test_the_tail_scan_is_bounded_and_reaches_into_the_last_rotated_file(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", max_bytes=64 * 1024, keep=3)
    _line(log, "old", "pending")
    for n in range(400):  # enough lines to rotate at least once
        _line(log, f"r{n}", "ok")
    _line(log, "late", "pending")
    assert len(list(tmp_path.glob("audit.log.0*"))) >= 1
    assert _open(log.path, budget=4096) == ["late"]  # "old" is beyond the window
    assert _open(log.path, budget=8 << 20) == ["old", "late"]
    # verify walks everything and reports both
    assert [r.request_id for r in verify_log(log.path).unfinished] == ["old", "late"]


def test_a_torn_tail_does_not_stop_the_scan(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    _line(log, "a1", "pending")
    with open(log.path, "ab") as f:
        f.write(b'{"code":"","decision":"allow')
    assert _open(log.path) == ["a1"]


def test_verify_reports_requests_without_an_outcome_and_still_passes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    _line(log, "a1", "pending", consent="asked")
    _line(log, "b2", "pending")
    _line(log, "b2", "interrupted", reason="removed ai-b2")
    out = io.StringIO()
    assert audit_verify_main(log.path, out) == 0
    text = out.getvalue()
    assert "1 request(s) have a pending line and no outcome" in text
    assert "request a1 (waiting for consent)" in text and "b2" not in text.split("note:")[1]
    out = io.StringIO()
    _line(log, "a1", "interrupted", consent="unanswered")
    audit_verify_main(log.path, out)
    assert "note:" not in out.getvalue()


def test_a_broken_configuration_still_names_the_gate_files(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'default_tier = "read"\n[[principal]\nbroken\n'
        '[paths]\ngate_socket = "/x/gate.sock"\naudit_log = "relative/not/allowed"\n'
        '[budget]\npool_cap = "1GiB"\n'
    )
    loaded = load_for_gate(config)
    assert not hasattr(loaded, "principals")
    paths = fallback_paths(config)
    assert paths.gate_socket == Path("/x/gate.sock")
    assert paths.audit_log == Path("/var/log/qubes-mcp/audit.log")  # not absolute: default
    assert fallback_paths(tmp_path / "missing.toml").gate_socket == Path("/run/qubes-mcp/gate.sock")
