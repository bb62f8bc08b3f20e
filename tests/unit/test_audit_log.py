"""The audit log as the gate uses it: durable appends, privacy, rotation, O(1) cost, recovery."""

from __future__ import annotations

import builtins
import io
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qubes_mcp.dom0.audit.files import anchor_path, archives, lock_path
from qubes_mcp.dom0.audit.log import AuditError, AuditLog
from qubes_mcp.dom0.audit.record import (
    ANCHOR_CAP,
    GENESIS,
    MAX_LINE_BYTES,
    Anchor,
    build_record,
    parse_anchor,
    parse_line,
)
from qubes_mcp.dom0.audit.verify import audit_verify_main, verify_log

SRC = Path(__file__).resolve().parents[2] / "src"
SMALL_MAX = 2 * MAX_LINE_BYTES  # the smallest rotation size allowed: rotates every ~100 lines


def entry(log: AuditLog, i: int = 0, **extra: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "principal": "work-agent",
        "op": "qmcp.Start",
        "targets": ["work-web"],
        "decision": "allowed",
        "outcome": "ok",
        "request_id": f"r{i}",
        "detail": {"source": "s" * 200, "size": i},
    }
    fields.update(extra)
    return log.append(**fields)  # type: ignore[arg-type]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "audit.log"


def test_appended_records_read_back_as_one_chain(log_path: Path) -> None:
    clock = iter([1_700_000_000.0, 1_700_000_001.5, 1_700_000_002.25])
    log = AuditLog(log_path, clock=lambda: next(clock))
    written = [
        entry(log, 1),
        entry(log, 2, decision="refused", outcome="not-run", code="not-found"),
        entry(log, 3, outcome="pending"),
    ]
    read = [parse_line(line) for line in lines(log_path)]
    assert read == written
    assert [r.seq for r in read] == [1, 2, 3]
    assert read[0].prev == GENESIS
    assert [r.prev for r in read[1:]] == [r.hash for r in read[:-1]]
    assert read[1].ts == "2023-11-14T22:13:21.500000Z"
    assert read[1].code == "not-found" and read[1].decision == "refused"
    assert parse_anchor(anchor_path(log_path).read_bytes()) == Anchor(3, read[2].hash)
    result = log.verify()
    assert (result.ok, result.entries, result.error) == (True, 3, None)


def test_the_log_is_private_to_its_owner_whatever_the_umask(log_path: Path) -> None:
    old = os.umask(0)
    try:
        entry(AuditLog(log_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700
    for path in (log_path, anchor_path(log_path), lock_path(log_path)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize(
    "mode", [0o755, 0o750, 0o701], ids=["world-readable-dir", "group-readable-dir", "o+x-dir"]
)
def test_a_directory_others_can_enter_is_refused(log_path: Path, mode: int) -> None:
    log_path.parent.mkdir()
    log_path.parent.chmod(mode)
    with pytest.raises(AuditError, match="private"):
        entry(AuditLog(log_path))
    assert not log_path.exists()


def test_a_log_file_others_can_read_is_refused(log_path: Path) -> None:
    entry(AuditLog(log_path))
    log_path.chmod(0o644)
    with pytest.raises(AuditError, match="private"):
        entry(AuditLog(log_path))
    assert len(lines(log_path)) == 1


def test_the_agent_sees_unavailable_and_the_operator_sees_why(log_path: Path) -> None:
    with pytest.raises(AuditError) as caught:
        entry(AuditLog(log_path, create=False))
    assert caught.value.to_reply() == {
        "ok": False,
        "error": {"code": "unavailable", "message": "qubes-mcp gate is unavailable"},
    }
    assert str(log_path) in str(caught.value)


def test_without_create_a_missing_log_is_refused_not_restarted(log_path: Path) -> None:
    log_path.parent.mkdir(mode=0o700)
    with pytest.raises(AuditError, match="create=False"):
        entry(AuditLog(log_path, create=False))
    assert not log_path.exists() or log_path.stat().st_size == 0


def test_a_caller_bug_writes_nothing(log_path: Path) -> None:
    log = AuditLog(log_path)
    entry(log, 1)
    with pytest.raises(ValueError, match="decision"):
        entry(log, 2, decision="yes")
    entry(log, 3)
    assert [parse_line(x).seq for x in lines(log_path)] == [1, 2]


def test_rotation_keeps_one_chain_across_files(log_path: Path) -> None:
    log = AuditLog(log_path, max_bytes=SMALL_MAX, keep=10)
    records = [entry(log, 0)]
    while len(archives(log_path)) < 3 and len(records) < 1000:
        records.append(entry(log, len(records)))
    records += [entry(log, len(records)) for _ in range(5)]
    rotated = archives(log_path)
    assert len(rotated) == 3
    for first_seq, path in rotated:
        assert parse_line(lines(path)[0]).seq == first_seq  # named by its first record
        assert path.stat().st_size <= SMALL_MAX
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first_of_current = parse_line(lines(log_path)[0])
    last_of_previous = parse_line(lines(rotated[-1][1])[-1])
    assert first_of_current.prev == last_of_previous.hash
    result = log.verify()
    assert (result.ok, result.entries) == (True, len(records)), result.error
    assert result.files == [p for _s, p in rotated] + [log_path]


def exported(log: AuditLog, count: int) -> int:
    """Append ``count`` records, recording an export checkpoint of the head after every ten:
    an operator who backs up often. Returns the records appended (checkpoints included)."""
    total = 0
    for i in range(count):
        record = entry(log, i)
        total += 1
        if i % 10 == 9:
            log.checkpoint(seq=record.seq, digest=record.hash)
            total += 1
    return total


def test_retention_deletes_the_oldest_exported_files_and_moves_the_anchor_base(
    log_path: Path,
) -> None:
    log = AuditLog(log_path, max_bytes=SMALL_MAX, keep=1)
    total = exported(log, 330)
    rotated = archives(log_path)
    assert len(rotated) == 1
    oldest = parse_line(lines(rotated[0][1])[0])
    assert oldest.seq > 1  # files were deleted
    anchor = parse_anchor(anchor_path(log_path).read_bytes())
    assert (anchor.base_seq, anchor.base_prev) == (oldest.seq, oldest.prev)
    result = log.verify()
    assert result.ok, result.error
    assert result.entries == total - oldest.seq + 1


def test_keep_zero_retains_only_the_current_file(log_path: Path) -> None:
    log = AuditLog(log_path, max_bytes=SMALL_MAX, keep=0)
    exported(log, 120)
    assert archives(log_path) == []
    assert parse_anchor(anchor_path(log_path).read_bytes()).base_seq > 1
    assert log.verify().ok


# --- O(1) append ------------------------------------------------------------------------


def seed(path: Path, count: int) -> None:
    """A valid log of ``count`` records written directly (fast: no fsync per line)."""
    path.parent.mkdir(mode=0o700)
    prev, out = GENESIS, []
    for seq in range(1, count + 1):
        rec = build_record(
            seq=seq,
            prev=prev,
            ts="2026-01-01T00:00:00.000000Z",
            principal="p",
            op="qmcp.Start",
            decision="allowed",
            outcome="ok",
            detail={"source": "s" * 400},
        )
        out.append(rec.line())
        prev = rec.hash
    path.write_bytes(b"".join(out))
    path.chmod(0o600)
    anchor_path(path).write_bytes(Anchor(count, prev).encode())
    anchor_path(path).chmod(0o600)


class DiskReads:
    """Counts every byte read through os.read/os.pread and every file opened with open()."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.opened: list[str] = []
        real_read, real_pread, real_open = os.read, os.pread, builtins.open

        def read(fd: int, n: int) -> bytes:
            data = real_read(fd, n)
            self.bytes += len(data)
            return data

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            self.bytes += len(data)
            return data

        def open_(file, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.opened.append(str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "read", read)
        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(builtins, "open", open_)


COLD_BOUND = (ANCHOR_CAP + 1) + (MAX_LINE_BYTES + 1)  # the anchor and the last line


@pytest.mark.parametrize("records", [10, 12_000], ids=["small-log", "5MB-log"])
def test_append_reads_a_bounded_number_of_bytes_however_big_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: int
) -> None:
    path = tmp_path / "log" / "audit.log"
    seed(path, records)
    assert path.stat().st_size > 400 * records
    disk = DiskReads(monkeypatch)
    log = AuditLog(path)
    entry(log, 1)  # cold: this instance has never seen the log
    cold = disk.bytes
    entry(log, 2)  # warm: only the anchor is read to confirm nothing changed
    warm = disk.bytes - cold
    entry(AuditLog(path), 3)  # another writer moves the end ...
    before = disk.bytes
    entry(log, 4)  # ... so this append re-reads the tail, still O(1)
    revalidate = disk.bytes - before
    assert cold <= COLD_BOUND
    assert warm <= ANCHOR_CAP + 1
    assert revalidate <= COLD_BOUND
    assert not [name for name in disk.opened if name.startswith(str(path))]
    assert parse_line(lines(path)[-1]).seq == records + 4


# --- crash recovery -------------------------------------------------------------------------


def test_a_torn_last_line_stops_appends_until_the_operator_recovers(log_path: Path) -> None:
    log = AuditLog(log_path)
    for i in range(3):
        entry(log, i)
    fragment = b'{"code":"","decision":"allo'
    with log_path.open("ab") as f:
        f.write(fragment)  # power loss in the middle of the fourth write
    with pytest.raises(AuditError, match="incomplete"):
        entry(AuditLog(log_path), 9)
    assert log_path.read_bytes().endswith(fragment)  # refused: nothing chained onto garbage
    assert verify_log(log_path).kind == "torn"

    rec = AuditLog(log_path).recover(reason="power cut at 14:02")
    assert (rec.seq, rec.op, rec.principal) == (4, "audit.recover", "dom0")
    assert rec.detail["torn_bytes"] == len(fragment)
    assert rec.detail["anchor_lag"] == 0
    assert rec.detail["reason"] == "power cut at 14:02"
    assert (log_path.parent / "audit.log.torn-4").read_bytes() == fragment
    assert verify_log(log_path).ok
    assert entry(AuditLog(log_path), 5).seq == 5


def test_a_record_written_but_not_anchored_is_recovered(log_path: Path) -> None:
    log = AuditLog(log_path)
    last = entry(log, 1)
    unanchored = build_record(
        seq=2,
        prev=last.hash,
        ts=last.ts,
        principal="work-agent",
        op="qmcp.Kill",
        decision="allowed",
        outcome="ok",
    )
    with log_path.open("ab") as f:
        f.write(unanchored.line())  # the process died before replacing the anchor
    with pytest.raises(AuditError, match="not anchored"):
        entry(AuditLog(log_path), 2)
    assert verify_log(log_path).kind == "unanchored"
    rec = AuditLog(log_path).recover()
    assert rec.seq == 3 and rec.prev == unanchored.hash and rec.detail["anchor_lag"] == 1
    assert verify_log(log_path).ok


def test_recover_refuses_when_there_is_nothing_to_recover(log_path: Path) -> None:
    log = AuditLog(log_path)
    entry(log, 1)
    with pytest.raises(AuditError, match="nothing to recover"):
        log.recover()
    assert len(lines(log_path)) == 1


def test_recover_refuses_to_launder_an_edit(log_path: Path) -> None:
    log = AuditLog(log_path)
    entry(log, 1)
    entry(log, 2)
    log_path.write_bytes(log_path.read_bytes().replace(b'"size":2', b'"size":3'))
    with pytest.raises(AuditError, match="not a valid record"):
        AuditLog(log_path).recover()
    assert verify_log(log_path).kind == "corrupt"


# --- concurrency ------------------------------------------------------------------------------


def test_many_threads_and_two_instances_make_one_unbroken_chain(log_path: Path) -> None:
    logs = [AuditLog(log_path, max_bytes=SMALL_MAX), AuditLog(log_path, max_bytes=SMALL_MAX)]
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                entry(logs[worker % 2], worker * 1000 + i)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    result = logs[0].verify()
    assert (result.ok, result.entries) == (True, 200), result.error
    ids = {
        parse_line(line).request_id
        for path in result.files
        for line in path.read_bytes().splitlines()
    }
    assert ids == {f"r{w * 1000 + i}" for w in range(8) for i in range(25)}


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from qubes_mcp.dom0.audit.log import AuditLog
    log = AuditLog(Path(sys.argv[1]), max_bytes=int(sys.argv[3]))
    print("ready", flush=True)
    sys.stdin.readline()  # start together with the other writers
    for i in range(int(sys.argv[2])):
        log.append(principal="p" + sys.argv[4], op="qmcp.Start", decision="allowed",
                   outcome="ok", request_id=f"{sys.argv[4]}-{i}", detail={"source": "s" * 200})
    """
)


def test_two_processes_and_a_thread_appending_lose_no_line(log_path: Path) -> None:
    entry(AuditLog(log_path), 0)  # create the directory before the race
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(log_path), "80", str(SMALL_MAX), name],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    log = AuditLog(log_path, max_bytes=SMALL_MAX)
    for i in range(80):
        entry(log, i, request_id=f"c-{i}")
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    result = verify_log(log_path)
    assert (result.ok, result.entries) == (True, 241), result.error
    ids = {
        parse_line(line).request_id
        for path in result.files
        for line in path.read_bytes().splitlines()
    }
    assert ids == {"r0"} | {f"{n}-{i}" for n in "abc" for i in range(80)}


# --- the operator's command -------------------------------------------------------------------


def test_verify_main_ok_prints_a_checkpoint_worth_writing_down(log_path: Path) -> None:
    log = AuditLog(log_path)
    last = [entry(log, i) for i in range(3)][-1]
    out = io.StringIO()
    assert audit_verify_main(log_path, out) == 0
    assert "3 records" in out.getvalue()
    assert f"checkpoint: 3:{last.hash}" in out.getvalue()
    assert audit_verify_main(log_path, io.StringIO(), checkpoint=(3, last.hash)) == 0


def test_verify_main_broken_names_the_file_and_line(log_path: Path) -> None:
    log = AuditLog(log_path)
    for i in range(3):
        entry(log, i)
    data = lines(log_path)
    log_path.write_bytes(data[0] + b"\n" + data[2] + b"\n")
    out = io.StringIO()
    assert audit_verify_main(log_path, out) == 1
    assert f"{log_path} line 2" in out.getvalue()
    assert "BROKEN (chain)" in out.getvalue()


def test_verify_main_without_a_log_is_a_usage_error(tmp_path: Path) -> None:
    out = io.StringIO()
    assert audit_verify_main(tmp_path / "nowhere" / "audit.log", out) == 2
    assert "no audit log" in out.getvalue()


def test_recover_main_repairs_a_crash_and_refuses_otherwise(log_path: Path) -> None:
    from qubes_mcp.dom0.operator.audit_cli import audit_recover_main

    log = AuditLog(log_path)
    entry(log, 1)
    out = io.StringIO()
    assert audit_recover_main(log_path, out) == 1
    assert "nothing to recover" in out.getvalue()
    with log_path.open("ab") as f:
        f.write(b"\x00" * 4096)  # a file system that zero-fills the block after power loss
    out = io.StringIO()
    assert audit_recover_main(log_path, out, reason="power cut") == 0
    assert "4096 torn bytes" in out.getvalue() and "seq 2" in out.getvalue()
    assert verify_log(log_path).ok


def test_a_disk_error_before_the_write_is_a_refusal_and_leaves_the_log_usable(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path)
    entry(log, 1)
    before = log_path.read_bytes()

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        with pytest.raises(AuditError, match="No space left"):
            entry(log, 2)
    assert log_path.read_bytes() == before
    assert entry(log, 3).seq == 2


def test_a_failed_anchor_update_removes_the_line_and_the_log_stays_usable(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line and its anchor are one unit (issue 11 §3): no line the anchor does not vouch
    for survives a failed append, so the next append needs no ``recover``."""
    import qubes_mcp.dom0.audit.log as audit_module

    log = AuditLog(log_path)
    entry(log, 1)
    before = log_path.read_bytes()

    def broken(path: Path, anchor: Anchor) -> Path:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(audit_module, "stage_anchor", broken)
        with pytest.raises(AuditError, match="Input/output"):
            entry(log, 2)
    assert log_path.read_bytes() == before
    assert entry(log, 3).seq == 2
    assert log.verify().ok


def test_a_line_that_cannot_be_cut_back_stops_appends_until_recover(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qubes_mcp.dom0.audit.log as audit_module

    log = AuditLog(log_path)
    entry(log, 1)

    def broken(path: Path, anchor: Anchor) -> Path:
        raise OSError(5, "Input/output error")

    def no_truncate(fd: int, size: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(audit_module, "stage_anchor", broken)
        patch.setattr(os, "ftruncate", no_truncate)
        with pytest.raises(AuditError, match="could not be removed"):
            entry(log, 2)
    with pytest.raises(AuditError, match="not anchored"):
        entry(log, 3)  # the same instance does not trust its cache after a failure
    assert log.recover(reason="disk hiccup").detail["anchor_lag"] == 1
    assert entry(log, 4).seq == 4
    assert log.verify().ok
