"""The audit log under real faults (issue 11 §3, issue 7 §6): a full and a read-only file
system, a tail cut inside the anchored record, a refused append that must leave nothing,
and retention that never deletes what the operator has not exported."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_mcp.dom0.audit.files import anchor_path, archives, exported_path
from qubes_mcp.dom0.audit.log import AuditError, AuditLog, chain_exists
from qubes_mcp.dom0.audit.record import MAX_LINE_BYTES, parse_anchor, parse_line
from qubes_mcp.dom0.audit.verify import audit_verify_main, verify_log
from qubes_mcp.dom0.operator.audit_cli import audit_checkpoint_main, audit_recover_main
from qubes_mcp.dom0.operator.install import install
from tests.emulator_process import RunningEmulator
from tests.fs_faults import fill, remount, small_tmpfs

SMALL_MAX = 2 * MAX_LINE_BYTES


def entry(log: AuditLog, i: int = 0, **extra: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "principal": "work-agent",
        "op": "qmcp.Start",
        "targets": ["work-web"],
        "decision": "allowed",
        "outcome": "pending",
        "request_id": f"r{i}",
        "detail": {"source": "s" * 200, "size": i},
    }
    fields.update(extra)
    return log.append(**fields)  # type: ignore[arg-type]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# --- a full disk: the line and its anchor are one unit --------------------------------------


def test_a_full_disk_refuses_leaves_no_line_and_resumes_without_recover(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        path = fs / "log" / "audit.log"
        log = AuditLog(path)
        for i in range(3):
            entry(log, i)
        filler = fill(fs)
        before = snapshot(path.parent)
        for i in range(20):  # the line fits in the file's last block; the anchor never does
            with pytest.raises(AuditError, match="No space left"):
                entry(log, 100 + i)
            assert snapshot(path.parent) == before  # no pending line the anchor does not vouch for
        assert verify_log(path).ok
        filler.unlink()  # space returns: no `recover`, the next append simply works
        assert entry(log, 200).seq == 4
        result = verify_log(path)
        assert result.ok and result.entries == 4, result.error


def test_a_line_longer_than_the_space_left_is_cut_back_too(tmp_path: Path) -> None:
    """A short write (part of the line on disk) is removed as well."""
    with small_tmpfs(tmp_path / "fs") as fs:
        path = fs / "log" / "audit.log"
        log = AuditLog(path)
        entry(log, 0)
        filler = fill(fs)
        size = path.stat().st_size
        big = {"source": "x" * 250, "template": "t" * 250, "klass": "k" * 250, "label": "l" * 250}
        with pytest.raises(AuditError):
            entry(log, 1, detail=big, targets=["t" * 250] * 8)
        assert path.stat().st_size == size
        filler.unlink()
        assert entry(log, 2).seq == 2
        assert verify_log(path).ok


def test_a_read_only_file_system_refuses_and_resumes_when_writable(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs") as fs:
        path = fs / "log" / "audit.log"
        log = AuditLog(path)
        entry(log, 0)
        log.close()  # a file open for writing would keep the remount from happening
        remount(fs, "ro")
        try:
            with pytest.raises(AuditError, match="Read-only"):
                entry(log, 1)
        finally:
            remount(fs, "rw")
        assert entry(log, 2).seq == 2
        assert verify_log(path).ok


# --- a refused append leaves nothing; install starts a chain --------------------------------


def test_a_refused_append_creates_no_file_and_install_starts_the_chain(
    emulator: RunningEmulator,
) -> None:
    # install reads the fleet (it registers the enrolled qubes): an emulated dom0 under root
    root = emulator.paths.root
    path = root / "var/log/qubes-mcp/audit.log"
    path.parent.mkdir(parents=True, mode=0o700)
    with pytest.raises(AuditError, match="create=False"):
        entry(AuditLog(path, create=False), 1)
    assert not path.exists()
    path.write_bytes(b"")  # what an older version's refused append left behind
    path.chmod(0o600)
    assert not chain_exists(path)
    out = install(root, principal="mcp-control", egress=None, exe="/usr/bin/qubes-mcp-admin")
    assert any("started the audit log" in line for line in out)
    result = verify_log(path)
    assert result.ok and result.entries == 1
    assert entry(AuditLog(path, create=False), 2).seq == 2


# --- a tail cut inside the anchored record ---------------------------------------------------


def cut(path: Path, count: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-count])


def test_the_documented_way_out_of_a_cut_tail_works(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path)
    records = [entry(log, i) for i in range(3)]
    cut(path, 40)
    out = io.StringIO()
    assert audit_verify_main(path, out) == 1
    advice = out.getvalue()
    assert "(torn)" in advice and "recover --accept-loss" in advice and "seq 3" in advice
    with pytest.raises(AuditError, match="--accept-loss"):
        AuditLog(path).recover()  # plain recover still refuses to lose a record silently
    out = io.StringIO()
    assert audit_recover_main(path, out, reason="disk cut", accept_loss=True) == 0
    assert "seq 3" in out.getvalue() and "lost" in out.getvalue()
    result = verify_log(path)
    assert result.ok, result.error
    recover = parse_line(path.read_bytes().splitlines()[-1])
    assert recover.op == "audit.recover"
    assert (recover.detail["lost_seq"], recover.detail["lost_hash"]) == (3, records[2].hash)
    assert recover.prev == records[1].hash  # the chain continues from the last whole record
    assert entry(AuditLog(path, create=False), 9).seq == 4


def test_a_cut_tail_that_contradicts_the_anchor_is_not_repaired(tmp_path: Path) -> None:
    """The fragment holds the record's hash: if that is not the anchored hash, it is an
    edit, and even --accept-loss refuses and changes nothing."""
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        entry(log, i)
    data = path.read_bytes()
    start = data.rfind(b'"hash":"') + len(b'"hash":"')
    flipped = b"0" if data[start : start + 1] != b"0" else b"1"
    path.write_bytes(data[:start] + flipped + data[start + 1 : -40])
    before = snapshot(path.parent)
    with pytest.raises(AuditError):
        AuditLog(path).recover(accept_loss=True)
    assert snapshot(path.parent) == before


def test_a_cut_first_record_of_a_fresh_file_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path, max_bytes=SMALL_MAX, keep=10)
    count = 0
    while not archives(path):
        entry(log, count)
        count += 1
    assert len(path.read_bytes().splitlines()) == 1  # the current file holds one record
    cut(path, 30)
    assert "--accept-loss" in (verify_log(path).error or "")
    facts = AuditLog(path).recover(accept_loss=True).detail
    assert facts["lost_seq"] == count
    assert verify_log(path).ok


def test_a_cut_only_record_of_a_new_log(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    entry(AuditLog(path), 0)
    cut(path, 30)
    assert AuditLog(path).recover(accept_loss=True).detail["lost_seq"] == 1
    result = verify_log(path)
    assert result.ok and result.entries == 1, result.error


# --- retention never forgets what was not exported ----------------------------------------


def refused(log: AuditLog, i: int) -> object:
    return entry(log, i, decision="refused", outcome="not-run", code="not-found")


def test_rotation_never_deletes_unexported_records_and_refuses_instead(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path, max_bytes=SMALL_MAX, keep=2)
    written = 0
    with pytest.raises(AuditError, match="not yet exported") as info:
        for i in range(5000):  # a flood of refusals
            refused(log, i)
            written += 1
    assert "audit checkpoint" in str(info.value)
    assert len(archives(path)) == 2
    result = verify_log(path)
    assert result.ok and result.entries == written  # nothing was forgotten
    assert parse_line(archives(path)[0][1].read_bytes().splitlines()[0]).seq == 1
    # an outcome still owed is written (past max_bytes), never lost
    assert entry(log, 1, outcome="ok").seq == written + 1
    with pytest.raises(AuditError, match="not yet exported"):
        entry(log, 2)  # but nothing new may start
    # the operator backs up the log and records the checkpoint: rotation resumes
    out = io.StringIO()
    assert audit_checkpoint_main(path, out, reason="copied to backup disk") == 0
    assert f"exported through seq {written + 1}" in out.getvalue()
    assert parse_anchor(exported_path(path).read_bytes()).seq == written + 1
    for i in range(200):
        refused(log, i)
    result = verify_log(path)
    assert result.ok, result.error
    anchor = parse_anchor(anchor_path(path).read_bytes())
    assert 1 < anchor.base_seq <= written + 2  # only exported records were deleted


def test_rotation_deletes_only_files_wholly_before_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path, max_bytes=SMALL_MAX, keep=1)
    count = 0
    while len(archives(path)) < 1:
        refused(log, count)
        count += 1
    first_archive_last = count - 1  # the rotated file ends before the current file's record
    assert AuditLog(path).checkpoint(seq=first_archive_last - 1, digest="0" * 64).seq
    with pytest.raises(AuditError, match="not yet exported"):
        for i in range(1000):
            refused(log, i)
    assert parse_line(archives(path)[0][1].read_bytes().splitlines()[0]).seq == 1


def test_checkpoint_refuses_a_broken_log_or_an_unknown_record(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        entry(log, i)
    out = io.StringIO()
    assert audit_checkpoint_main(path, out, through=(2, "f" * 64)) == 1
    assert not exported_path(path).exists()
    cut(path, 10)
    assert audit_checkpoint_main(path, io.StringIO()) == 1
    assert not exported_path(path).exists()
    assert os.stat(path.parent).st_mode & 0o077 == 0


# --- the operator's commands ------------------------------------------------------------------


def admin(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qubes_mcp.dom0.operator.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_admin_commands_verify_recover_and_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        entry(log, i)
    cut(path, 25)
    verify = admin("audit", "verify", "--log", str(path))
    assert verify.returncode == 1 and "recover --accept-loss" in verify.stdout
    assert admin("audit", "recover", "--log", str(path)).returncode == 1
    done = admin("audit", "recover", "--log", str(path), "--accept-loss", "--reason", "cut")
    assert done.returncode == 0, done.stdout + done.stderr
    verify = admin("audit", "verify", "--log", str(path))
    assert verify.returncode == 0, verify.stdout
    head = verify.stdout.split("checkpoint: ", 1)[1].split()[0]
    done = admin("audit", "checkpoint", "--log", str(path), "--through", head)
    assert done.returncode == 0, done.stdout + done.stderr
    assert parse_anchor(exported_path(path).read_bytes()).seq == int(head.split(":")[0])
    assert admin("audit", "checkpoint", "--log", str(path), "--through", "x").returncode == 1


def test_the_operator_socket_reports_why_the_gate_stopped(tmp_path: Path) -> None:
    from qubes_mcp.dom0.daemon import GateDaemon
    from tests.gate_fixtures import config

    daemon = GateDaemon(config(), audit=AuditLog(tmp_path / "log" / "audit.log"))
    status = daemon._operator({"cmd": "status"})["status"]
    assert status["serving"] == "all requests" and status["halted"] is None
    daemon.gate.halted = "the outcome of qube.start (request r1) could not be recorded: full"
    status = daemon._operator({"cmd": "status"})["status"]
    assert status["serving"] == "reads only" and "could not be recorded" in status["halted"]
