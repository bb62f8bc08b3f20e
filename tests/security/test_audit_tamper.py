"""Tampering with the audit log is detected: edits, deletions, reorders, truncation, forgery.

The attacker here can edit the log files but not the anchor file consistently (that takes
the same dom0 root that could rewrite everything; the checkpoint test shows what still
catches that). Every case is: a valid rotated log, one targeted mutation, verify must fail
with the kind that names the attack — and append must not launder it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qubes_mcp.dom0.audit.files import anchor_path, archives
from qubes_mcp.dom0.audit.log import AuditError, AuditLog
from qubes_mcp.dom0.audit.record import (
    MAX_LINE_BYTES,
    Anchor,
    AuditRecord,
    build_record,
    parse_anchor,
    parse_line,
)
from qubes_mcp.dom0.audit.verify import verify_log

SMALL_MAX = 2 * MAX_LINE_BYTES


def entry(log: AuditLog, i: int) -> AuditRecord:
    return log.append(
        principal="work-agent",
        op="qmcp.Start",
        targets=["work-web"],
        decision="allowed",
        outcome="ok",
        request_id=f"r{i}",
        detail={"source": "s" * 200, "size": i},
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid log with three rotated files and a current file of a few records."""
    path = tmp_path_factory.mktemp("template") / "log" / "audit.log"
    log = AuditLog(path, max_bytes=SMALL_MAX, keep=5)
    count = 0
    while len(archives(path)) < 3:
        entry(log, count)
        count += 1
    for _ in range(10):
        entry(log, count)
        count += 1
    assert log.verify().ok
    return path


@pytest.fixture
def log_path(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template.parent, tmp_path / "log")  # copy2 keeps the 0600/0700 modes
    return tmp_path / "log" / "audit.log"


def read(file: Path) -> list[bytes]:
    return file.read_bytes().splitlines(keepends=True)


def write(file: Path, lines: list[bytes]) -> None:
    file.write_bytes(b"".join(lines))


def oldest(path: Path) -> Path:
    return archives(path)[0][1]


def middle(path: Path) -> Path:
    return archives(path)[1][1]


def forged(record: AuditRecord, *, prev: str | None = None) -> AuditRecord:
    """The same record with another principal and a correctly recomputed hash."""
    return build_record(
        seq=record.seq,
        prev=record.prev if prev is None else prev,
        ts=record.ts,
        principal="someone-else",
        op=record.op,
        targets=record.targets,
        decision=record.decision,
        outcome=record.outcome,
        code=record.code,
        request_id=record.request_id,
        detail=dict(record.detail),
    )


# --- the attacks ----------------------------------------------------------------------------


def edit_archived_line(path: Path) -> None:
    lines = read(middle(path))
    lines[5] = lines[5].replace(b'"work-web"', b'"work-wev"')
    write(middle(path), lines)


def edit_current_line(path: Path) -> None:
    lines = read(path)
    lines[3] = lines[3].replace(b'"allowed"', b'"refused"')
    write(path, lines)


def edit_last_line(path: Path) -> None:
    lines = read(path)
    lines[-1] = lines[-1].replace(b'"qmcp.Start"', b'"qmcp.Stop"')
    write(path, lines)


def delete_middle_line(path: Path) -> None:
    lines = read(middle(path))
    write(middle(path), lines[:10] + lines[11:])


def delete_first_line(path: Path) -> None:
    write(oldest(path), read(oldest(path))[1:])


def delete_last_line(path: Path) -> None:
    write(path, read(path)[:-1])


def cut_last_three_lines(path: Path) -> None:
    write(path, read(path)[:-3])


def truncate_current_to_zero(path: Path) -> None:
    path.write_bytes(b"")


def delete_current_file(path: Path) -> None:
    path.unlink()


def delete_middle_archive(path: Path) -> None:
    middle(path).unlink()


def delete_oldest_archive(path: Path) -> None:
    oldest(path).unlink()


def swap_two_lines(path: Path) -> None:
    lines = read(middle(path))
    lines[3], lines[4] = lines[4], lines[3]
    write(middle(path), lines)


def duplicate_a_line(path: Path) -> None:
    lines = read(middle(path))
    write(middle(path), [*lines[:8], lines[7], *lines[8:]])


def rename_an_archive(path: Path) -> None:
    seq, file = archives(path)[1]
    file.rename(file.with_name(f"{path.name}.{seq + 1:012d}"))


def swap_archive_contents(path: Path) -> None:
    first, second = middle(path), archives(path)[2][1]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def tear_last_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-40])


def forge_last_line(path: Path) -> None:
    lines = read(path)
    lines[-1] = forged(parse_line(lines[-1][:-1])).line()
    write(path, lines)


def forge_middle_line_and_rechain(path: Path) -> None:
    lines = read(path)
    records = [parse_line(line[:-1]) for line in lines]
    out = lines[:2]
    prev = records[1].hash
    for record in records[2:]:
        new = forged(record, prev=prev) if record is records[2] else _rechained(record, prev)
        out.append(new.line())
        prev = new.hash
    write(path, out)


def _rechained(record: AuditRecord, prev: str) -> AuditRecord:
    return build_record(
        seq=record.seq,
        prev=prev,
        ts=record.ts,
        principal=record.principal,
        op=record.op,
        targets=record.targets,
        decision=record.decision,
        outcome=record.outcome,
        request_id=record.request_id,
        detail=dict(record.detail),
    )


def append_forged_line(path: Path) -> None:
    last = parse_line(read(path)[-1][:-1])
    extra = build_record(
        seq=last.seq + 1,
        prev=last.hash,
        ts=last.ts,
        principal="work-agent",
        op="qmcp.Remove",
        decision="allowed",
        outcome="ok",
    )
    path.write_bytes(path.read_bytes() + extra.line())


def insert_line_from_another_log(path: Path) -> None:
    stranger = build_record(
        seq=1,
        prev="0" * 64,
        ts="2026-01-01T00:00:00.000000Z",
        principal="x",
        op="y",
        decision="allowed",
        outcome="ok",
    )
    lines = read(path)
    write(path, [*lines[:2], stranger.line(), *lines[2:]])


def garbage_in_anchor(path: Path) -> None:
    anchor_path(path).write_bytes(b'{"seq": 1}\n')


def anchor_pointing_elsewhere(path: Path) -> None:
    anchor = parse_anchor(anchor_path(path).read_bytes())
    edited = Anchor(anchor.seq, "f" * 64, anchor.base_seq, anchor.base_prev)
    anchor_path(path).write_bytes(edited.encode())


def roll_the_anchor_back(path: Path) -> None:
    earlier = parse_line(read(path)[-4][:-1])
    anchor = parse_anchor(anchor_path(path).read_bytes())
    rolled = Anchor(earlier.seq, earlier.hash, anchor.base_seq, anchor.base_prev)
    anchor_path(path).write_bytes(rolled.encode())


def delete_anchor(path: Path) -> None:
    anchor_path(path).unlink()


def make_log_world_readable(path: Path) -> None:
    path.chmod(0o644)


def make_directory_group_readable(path: Path) -> None:
    path.parent.chmod(0o750)


ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "edit-a-byte-of-a-rotated-file": (edit_archived_line, "corrupt"),
    "edit-a-decision-in-the-current-file": (edit_current_line, "corrupt"),
    "edit-the-last-line": (edit_last_line, "corrupt"),
    "delete-a-middle-line": (delete_middle_line, "chain"),
    "delete-the-oldest-line": (delete_first_line, "retention"),
    "truncate-the-tail-by-one-line": (delete_last_line, "truncated"),
    "truncate-the-tail-by-three-lines": (cut_last_three_lines, "truncated"),
    "truncate-the-current-file-to-zero": (truncate_current_to_zero, "truncated"),
    "delete-the-current-file": (delete_current_file, "truncated"),
    "delete-a-middle-rotated-file": (delete_middle_archive, "chain"),
    "delete-the-oldest-retained-file": (delete_oldest_archive, "retention"),
    "reorder-two-lines": (swap_two_lines, "chain"),
    "duplicate-a-line": (duplicate_a_line, "chain"),
    "rename-a-rotated-file": (rename_an_archive, "chain"),
    "swap-two-rotated-files": (swap_archive_contents, "chain"),
    "tear-the-last-line": (tear_last_line, "torn"),
    "forge-the-last-line-with-a-recomputed-hash": (forge_last_line, "forged"),
    "forge-a-line-and-rechain-all-after-it": (forge_middle_line_and_rechain, "forged"),
    "append-a-forged-but-chained-line": (append_forged_line, "unanchored"),
    "insert-a-line-from-another-log": (insert_line_from_another_log, "chain"),
    "garbage-in-the-anchor": (garbage_in_anchor, "anchor"),
    "anchor-pointing-at-another-hash": (anchor_pointing_elsewhere, "forged"),
    "roll-the-anchor-back-three-records": (roll_the_anchor_back, "unanchored"),
    "delete-the-anchor": (delete_anchor, "anchor"),
    "make-the-log-world-readable": (make_log_world_readable, "permissions"),
    "make-the-directory-group-readable": (make_directory_group_readable, "permissions"),
}


@pytest.mark.parametrize(("attack", "kind"), ATTACKS.values(), ids=ATTACKS.keys())
def test_verify_detects(log_path: Path, attack: Callable[[Path], None], kind: str) -> None:
    assert verify_log(log_path).ok
    attack(log_path)
    result = verify_log(log_path)
    assert not result.ok
    assert result.kind == kind, result.error
    assert result.error


# Append checks only the end of the log (that is what keeps it O(1)); edits further back are
# verify's to find.
REFUSED_BY_APPEND = [
    "edit-the-last-line",
    "truncate-the-tail-by-one-line",
    "truncate-the-tail-by-three-lines",
    "tear-the-last-line",
    "forge-the-last-line-with-a-recomputed-hash",
    "forge-a-line-and-rechain-all-after-it",
    "append-a-forged-but-chained-line",
    "garbage-in-the-anchor",
    "anchor-pointing-at-another-hash",
    "roll-the-anchor-back-three-records",
    "delete-the-anchor",
    "make-the-log-world-readable",
    "make-the-directory-group-readable",
]


@pytest.mark.parametrize("name", REFUSED_BY_APPEND)
def test_append_refuses_to_chain_onto_a_tampered_end(log_path: Path, name: str) -> None:
    attack, _kind = ATTACKS[name]
    attack(log_path)
    before = {p.name: p.read_bytes() for p in log_path.parent.iterdir() if p.is_file()}
    with pytest.raises(AuditError):
        entry(AuditLog(log_path), 999)
    after = {p.name: p.read_bytes() for p in log_path.parent.iterdir() if p.is_file()}
    assert after == before  # nothing written, in particular no new chain from genesis


@pytest.mark.parametrize("name", ["truncate-the-current-file-to-zero", "delete-the-current-file"])
def test_appending_after_a_deleted_current_file_keeps_the_evidence(
    log_path: Path, name: str
) -> None:
    anchor = parse_anchor(anchor_path(log_path).read_bytes())
    ATTACKS[name][0](log_path)
    record = entry(AuditLog(log_path), 999)  # chains onto the anchor, not onto genesis
    assert (record.seq, record.prev) == (anchor.seq + 1, anchor.hash)
    result = verify_log(log_path)
    assert result.kind == "chain" and "missing" in (result.error or "")


def test_every_single_byte_change_in_a_small_log_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "log" / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        entry(log, i)
    original = path.read_bytes()
    for index in range(len(original)):
        mutated = bytearray(original)
        mutated[index] ^= 0x01
        path.write_bytes(bytes(mutated))
        assert not verify_log(path).ok, f"byte {index} ({original[index : index + 1]!r})"
    path.write_bytes(original)
    assert verify_log(path).ok


def test_a_consistent_rewrite_of_log_and_anchor_is_caught_by_a_checkpoint(
    log_path: Path,
) -> None:
    """The limit of any local anchor: root who rewrites the anchor too can cut the tail.

    A (seq, hash) the operator copied off-box from an earlier verify still catches it.
    """
    lines = read(log_path)
    checkpoint = parse_line(lines[-1][:-1])
    kept = lines[:-2]
    write(log_path, kept)
    anchor = parse_anchor(anchor_path(log_path).read_bytes())
    new_end = parse_line(kept[-1][:-1])
    anchor_path(log_path).write_bytes(
        Anchor(new_end.seq, new_end.hash, anchor.base_seq, anchor.base_prev).encode()
    )
    assert verify_log(log_path).ok  # indistinguishable from a log that ended there
    result = verify_log(log_path, checkpoint=(checkpoint.seq, checkpoint.hash))
    assert (result.ok, result.kind) == (False, "checkpoint")


def test_deleting_whole_oldest_files_beyond_the_anchor_base_is_retention(
    log_path: Path,
) -> None:
    """Files older than the anchor's base are awaiting deletion: removing them is normal."""
    anchor = parse_anchor(anchor_path(log_path).read_bytes())
    second_seq, second = archives(log_path)[1]
    first_of_second = parse_line(read(second)[0][:-1])
    anchor_path(log_path).write_bytes(
        Anchor(anchor.seq, anchor.hash, second_seq, first_of_second.prev).encode()
    )
    assert verify_log(log_path).ok  # the oldest file still chains into the base
    oldest(log_path).unlink()
    assert verify_log(log_path).ok


@pytest.mark.parametrize(
    "name",
    [
        "tear-the-last-line",
        "truncate-the-tail-by-one-line",
        "forge-the-last-line-with-a-recomputed-hash",
        "roll-the-anchor-back-three-records",
        "delete-the-anchor",
    ],
)
def test_recover_does_not_launder_tampering_as_a_crash(log_path: Path, name: str) -> None:
    """A line cut in the middle *after* it was anchored is no crash: a crash tears only a
    line that was never anchored. recover refuses and changes nothing."""
    ATTACKS[name][0](log_path)
    before = {p.name: p.read_bytes() for p in log_path.parent.iterdir() if p.is_file()}
    with pytest.raises(AuditError):
        AuditLog(log_path).recover()
    after = {p.name: p.read_bytes() for p in log_path.parent.iterdir() if p.is_file()}
    assert after == before
