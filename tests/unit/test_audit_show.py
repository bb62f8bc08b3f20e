"""``audit show``: one line per request, every filter, across rotated files, verified as it is
read (a tampered line is marked and what follows is UNVERIFIED), a JSON form that round-trips,
``--follow``, and nothing from the log can drive the terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.audit.clean import Argv
from qubes_mcp.dom0.audit.files import archives
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.record import GENESIS, MAX_LINE_BYTES, AuditRecord, chain_hash
from qubes_mcp.dom0.audit.show import Bound, Entry, Filters, audit_show_main

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 60
        return self.now


def fleet_log(path: Path, **kwargs: Any) -> AuditLog:
    """A small history: an install, a run (pending + outcome), a refusal, an operator tier
    change (pending + outcome), a copy, a failed start."""
    log = AuditLog(path, clock=Clock(), **kwargs)
    log.append(principal="operator", op="install", decision="allowed", outcome="ok")  # 1
    log.append(
        principal="mcp-control",
        op="qube.run",
        targets=["ai-dev"],
        decision="allowed",
        outcome="pending",
        request_id="r1",
    )  # 2
    log.append(
        principal="mcp-control",
        op="qube.start",
        targets=["vault"],
        decision="refused",
        outcome="not-run",
        code="not-found",
        request_id="r2",
    )  # 3
    log.append(
        principal="mcp-control",
        op="qube.run",
        targets=["ai-dev"],
        decision="allowed",
        outcome="ok",
        request_id="r1",
        detail={"argv": Argv(("id", "-u")), "exit_code": 0, "stdout_bytes": 2},
    )  # 4
    log.append(
        principal="operator:0",
        op="operator.tier",
        targets=["ai-web"],
        decision="allowed",
        outcome="pending",
        request_id="op-1",
        detail={"tier": "net", "uid": 0},
    )  # 5
    log.append(
        principal="operator:0",
        op="operator.tier",
        targets=["ai-web"],
        decision="allowed",
        outcome="ok",
        request_id="op-1",
        detail={"tier": "net", "uid": 0},
    )  # 6
    log.append(
        principal="auditor",
        op="file.copy",
        targets=["ai-dev"],
        decision="allowed",
        outcome="pending",
        request_id="r3",
        detail={"dest": "ai-dump", "files": 1},
    )  # 7
    log.append(
        principal="auditor",
        op="file.copy",
        targets=["ai-dev"],
        decision="allowed",
        outcome="ok",
        request_id="r3",
        detail={"dest": "ai-dump", "files": 1},
    )  # 8
    log.append(
        principal="mcp-control",
        op="qube.start",
        targets=["ai-web"],
        decision="allowed",
        outcome="pending",
        request_id="r4",
    )  # 9
    log.append(
        principal="mcp-control",
        op="qube.start",
        targets=["ai-web"],
        decision="allowed",
        outcome="failed",
        code="failed",
        request_id="r4",
    )  # 10
    return log


def show(path: Path, filters: Filters | None = None, **kwargs: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = audit_show_main(path, out, filters or Filters(), **kwargs)
    return status, out.getvalue().splitlines()


def firsts(lines: list[str]) -> list[int]:
    """The first seq of each timeline line."""
    return [
        int(part[1:].split("-")[0]) for line in lines for part in line.split() if part[0] == "#"
    ]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "log" / "audit.log"
    fleet_log(path).close()
    return path


def test_one_line_per_request_pending_paired_with_its_outcome(log_path: Path) -> None:
    status, lines = show(log_path)
    assert status == 0
    assert firsts(lines) == [1, 3, 2, 5, 7, 9]  # in the order requests finished
    run = next(line for line in lines if "#2-4" in line)
    assert "mcp-control qube.run ai-dev allowed/ok" in run
    assert "argv=[id -u]" in run and "exit_code=0" in run
    refused = next(line for line in lines if "#3 " in line)
    assert "refused/not-run(not-found)" in refused
    assert "allowed/failed(failed)" in lines[-1]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (Filters(since=Bound.parse("seq:5")), [5, 7, 9]),
        (Filters(until=Bound.parse("seq:3")), [1, 3, 2]),
        (Filters(since=Bound.parse("seq:2"), until=Bound.parse("seq:5")), [3, 2, 5]),
        # the clock ticks a minute per record: seq N is at T0 + 60 N
        (Filters(since=Bound.parse("2027-01-15T08:05:00Z")), [5, 7, 9]),
        (Filters(until=Bound.parse("2027-01-15T08:03:00")), [1, 3, 2]),
        (Filters(since=Bound.parse("2027-01-15T09:05:00+01:00")), [5, 7, 9]),
        (Filters(principal="mcp-control"), [3, 2, 9]),
        (Filters(principal="operator*"), [1, 5]),
        (Filters(qube="ai-web"), [5, 9]),
        (Filters(qube="ai-dump"), [7]),  # a copy's destination counts as a qube it names
        (Filters(op="operator.*"), [5]),
        (Filters(op="qube.run"), [2]),
        (Filters(outcome="ok"), [1, 2, 5, 7]),
        (Filters(outcome="failed"), [9]),
        (Filters(outcome="refused"), [3]),
        (Filters(principal="mcp-control", qube="ai-dev", outcome="ok"), [2]),
    ],
)
def test_every_filter(log_path: Path, filters: Filters, expected: list[int]) -> None:
    status, lines = show(log_path, filters)
    assert status == 0 and firsts(lines) == expected


@pytest.mark.parametrize("bad", ["seq:x", "yesterday", "2027-13-01"])
def test_a_bad_bound_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="seq:N"):
        Bound.parse(bad)


def test_reads_across_rotated_files_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path, max_bytes=2 * MAX_LINE_BYTES, keep=50)
    for i in range(60):
        log.append(
            principal="mcp-control",
            op="qube.run",
            targets=["ai-dev"],
            decision="refused",
            outcome="not-run",
            request_id=f"r{i}",
            detail={"argv": Argv(("x" * 3000,))},
        )
    assert len(archives(path)) >= 3
    status, lines = show(path)
    assert status == 0 and firsts(lines) == list(range(1, 61))
    assert not any("UNVERIFIED" in line for line in lines)


def test_a_tampered_line_is_marked_and_what_follows_is_unverified(log_path: Path) -> None:
    data = log_path.read_bytes().split(b"\n")
    data[5] = data[5].replace(b"ai-web", b"ai-dev")  # seq 6: the operator's tier change
    log_path.write_bytes(b"\n".join(data))
    status, lines = show(log_path)
    assert status == 1
    marker = next(i for i, line in enumerate(lines) if line.startswith("!! "))
    assert "verification FAILED (corrupt)" in lines[marker] and "line 6" in lines[marker]
    assert all(not line.startswith("UNVERIFIED") for line in lines[:marker])
    after = lines[marker + 1 :]
    assert after and all(line.startswith("UNVERIFIED") for line in after)


def test_a_deleted_line_breaks_the_chain_and_is_marked(log_path: Path) -> None:
    data = log_path.read_bytes().split(b"\n")
    del data[2]  # seq 3
    log_path.write_bytes(b"\n".join(data))
    status, lines = show(log_path)
    assert status == 1
    assert any("FAILED (chain)" in line and "records 3..3 are missing" in line for line in lines)


def test_a_cut_tail_is_marked(log_path: Path) -> None:
    data = log_path.read_bytes().split(b"\n")
    log_path.write_bytes(b"\n".join(data[:-2]) + b"\n")  # the last record is gone
    status, lines = show(log_path)
    assert status == 1 and any("FAILED (truncated)" in line for line in lines)


def test_json_round_trips_the_records(log_path: Path) -> None:
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    by_seq = {r["seq"]: r for r in records}
    status, lines = show(log_path, as_json=True)
    assert status == 0
    objects = [json.loads(line) for line in lines]
    assert [o["seq"] for o in objects] == [1, 3, 2, 5, 7, 9]
    for obj in objects:
        first, last = by_seq[obj["seq"]], by_seq[obj["last_seq"]]
        for key in ("ts", "principal", "op", "targets", "request_id"):
            assert obj[key] == first[key]
        assert (obj["decision"], obj["outcome"], obj["code"]) == (
            last["decision"],
            last["outcome"],
            last["code"],
        )
        assert obj["detail"] == {**first["detail"], **last["detail"]}
        assert obj["end_ts"] == last["ts"] and obj["verified"] is True
    assert all(line.isascii() for line in lines)


def test_follow_prints_a_request_appended_after_it_started(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    writer = AuditLog(path, max_bytes=2 * MAX_LINE_BYTES, keep=50)
    writer.append(principal="operator", op="install", decision="allowed", outcome="ok")
    out = io.StringIO()
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            audit_show_main(path, out, follow=True, interval=0.05, stop=stop)
        )
    )
    thread.start()
    try:
        _wait_for(out, "#1 ")
        # enough to rotate the file under the follower, then one more it must still see
        for i in range(30):
            writer.append(
                principal="mcp-control",
                op="qube.run",
                targets=["ai-dev"],
                decision="refused",
                outcome="not-run",
                request_id=f"r{i}",
                detail={"argv": Argv(("y" * 3000,))},
            )
        writer.append(
            principal="mcp-control",
            op="qube.kill",
            targets=["ai-x"],
            decision="allowed",
            outcome="ok",
            request_id="last",
        )
        assert archives(path)
        _wait_for(out, "qube.kill ai-x")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and result == [0]
    assert firsts(out.getvalue().splitlines()) == list(range(1, 33))


def _wait_for(out: io.StringIO, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in out.getvalue():
        assert time.monotonic() < deadline, f"{text!r} not shown: {out.getvalue()!r}"
        time.sleep(0.02)


def test_follow_stops_cleanly_on_sigint(log_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qubes_mcp.dom0.operator.cli",
            "audit",
            "show",
            "--follow",
            "--log",
            str(log_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it is running and has printed the log
        assert "#1 " in first
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err


def test_no_log_is_exit_2(tmp_path: Path) -> None:
    status, lines = show(tmp_path / "nothing" / "audit.log")
    assert status == 2 and "no audit log" in lines[0]


# --- nothing reaches the terminal but printable ASCII ------------------------------------------

HOSTILE = "x\ny\r\x1b[2J\x1b]0;title\x07\u202eevil\u2066\u200bé\U0001f600\x00\\"


def test_hostile_values_through_the_log_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    with AuditLog(path) as log:
        log.append(
            principal=HOSTILE,
            op=HOSTILE,
            targets=[HOSTILE],
            decision="refused",
            outcome="not-run",
            code=HOSTILE,
            request_id=HOSTILE,
            detail={"argv": Argv((HOSTILE, HOSTILE)), "path": HOSTILE, "reason": HOSTILE},
        )
    for as_json in (False, True):
        status, lines = show(path, as_json=as_json)
        assert status == 0 and len(lines) == 1
        assert all(0x20 <= ord(c) < 0x7F for c in lines[0]), lines[0]


def test_a_hand_written_record_with_raw_controls_is_escaped_too() -> None:
    """Even a record the log would never write (raw ESC, bidi, newline) prints as ASCII."""
    body: dict[str, object] = {
        "v": 1,
        "seq": 1,
        "ts": HOSTILE,
        "prev": GENESIS,
        "principal": HOSTILE,
        "op": HOSTILE,
        "targets": [HOSTILE],
        "decision": "allowed",
        "code": HOSTILE,
        "outcome": "ok",
        "request_id": "",
        "detail": {"argv": [HOSTILE], "path": HOSTILE},
    }
    record = AuditRecord(
        seq=1,
        ts=HOSTILE,
        prev=GENESIS,
        hash=chain_hash(body),
        principal=HOSTILE,
        op=HOSTILE,
        targets=(HOSTILE,),
        decision="allowed",
        code=HOSTILE,
        outcome="ok",
        request_id="",
        detail={"argv": [HOSTILE], "path": HOSTILE},
    )
    line = Entry(record).text()
    assert all(0x20 <= ord(c) < 0x7F for c in line), line
    assert "\\x1b" in line and "\\u202e" in line and "\\n" in line


def test_the_cli_prints_the_timeline(log_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qubes_mcp.dom0.operator.cli",
            "audit",
            "show",
            "--log",
            str(log_path),
            "--op",
            "qube.*",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [3, 2, 9]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "qubes_mcp.dom0.operator.cli",
            "audit",
            "show",
            "--log",
            str(log_path),
            "--since",
            "last tuesday",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "seq:N" in bad.stderr
