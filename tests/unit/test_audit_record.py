"""Audit records: hostile values are tamed, lines are canonical, and any edit is caught."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubes_mcp.dom0.audit.clean import DETAIL_KEYS, LIST_CAP, TEXT_CAP, clean_text
from qubes_mcp.dom0.audit.record import (
    GENESIS,
    MAX_LINE_BYTES,
    Anchor,
    RecordError,
    build_record,
    parse_anchor,
    parse_line,
)

TS = "2026-01-01T00:00:00.000000Z"


def record(**overrides: object):  # type: ignore[no-untyped-def]
    fields: dict[str, object] = {
        "seq": 1,
        "prev": GENESIS,
        "ts": TS,
        "principal": "work-agent",
        "op": "qmcp.Start",
        "targets": ["work-web"],
        "decision": "allowed",
        "outcome": "ok",
        "request_id": "r1",
        "detail": {"size": 1},
    }
    fields.update(overrides)
    return build_record(**fields)  # type: ignore[arg-type]


HOSTILE = {
    "newline-injects-a-fake-line": 'x\n{"seq":99}',
    "carriage-return": "a\rb",
    "nul-byte": "a\x00b",
    "escape-sequence-for-the-terminal": "\x1b[2J\x1b]0;pwned\x07",
    "bidi-override-hides-text": "safe\u202eexe.txt",
    "unicode-line-separator": "a\u2028b\u2029c",
    "lone-surrogate": "a\udcff",
    "backslash-fakes-an-escape": "\\x0a",
    "quote-breaks-json": 'a"b',
    "one-megabyte-string": "A" * 1_000_000,
    "one-megabyte-of-newlines": "\n" * 1_000_000,
    "non-utf8-bytes": b"\xff\xfe\x00\n",
    "one-megabyte-of-bytes": b"\x80" * 1_000_000,
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_printable_and_capped(value: object) -> None:
    cleaned = clean_text(value)
    assert cleaned.isprintable()
    assert len(cleaned) <= TEXT_CAP + 30  # the cap plus the "…[+N chars]" marker


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_values_cannot_break_the_line_format(value: object) -> None:
    rec = record(
        principal=value,
        op=value,
        targets=[value] * 50,
        code=value,
        request_id=value,
        detail={"source": value, "files": [value] * 50},
    )
    line = rec.line()
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert len(line) <= MAX_LINE_BYTES
    assert all(byte >= 0x20 for byte in line[:-1])  # no raw control byte at all
    assert parse_line(line[:-1]) == rec


def test_escaping_is_unambiguous_between_a_byte_and_its_spelling() -> None:
    assert clean_text(b"\x0a") != clean_text("\\x0a")
    assert clean_text("\n") == "\\x0a"
    assert clean_text("\\") == "\\\\"


def test_truncation_says_how_much_was_dropped() -> None:
    assert clean_text("A" * 1000).endswith("…[+744 chars]")
    assert clean_text(b"\x80" * 1000).endswith("bytes]")


def test_lists_are_capped_with_a_count() -> None:
    rec = record(targets=[f"q{i}" for i in range(100)])
    assert len(rec.targets) == LIST_CAP + 1
    assert rec.targets[-1] == f"…[+{100 - LIST_CAP} items]"


def test_detail_keeps_only_structural_keys_and_names_the_rest() -> None:
    rec = record(
        detail={
            "property": "netvm",
            "value": "secret-property-value",
            "output": "command output",
            "overflow": 1,  # reserved for the log itself
        }
    )
    assert dict(rec.detail) == {
        "property": "netvm",
        "dropped_keys": ["output", "overflow", "value"],
    }
    assert b"secret-property-value" not in rec.line()


def test_an_oversized_detail_becomes_an_overflow_marker_and_the_record_stays() -> None:
    keys = sorted(DETAIL_KEYS - {"dropped_keys", "overflow"})
    rec = record(detail={key: ["\U0001f600" * 300] * 8 for key in keys})
    assert set(rec.detail) == {"overflow"}
    assert len(rec.line()) <= MAX_LINE_BYTES
    assert rec.principal == "work-agent"


@pytest.mark.parametrize(
    ("field", "value"),
    [("decision", "maybe"), ("outcome", "done"), ("decision", "")],
    ids=["unknown-decision", "unknown-outcome", "empty-decision"],
)
def test_the_fixed_words_are_checked(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=field):
        record(**{field: value})


def test_integers_beyond_64_bits_and_floats_are_logged_as_text() -> None:
    rec = record(detail={"size": 2**70, "bytes": 1.5, "files": [True, None]})
    assert rec.detail["size"] == str(2**70)
    assert rec.detail["bytes"] == "1.5"
    assert rec.detail["files"] == [True, "None"]


def test_the_hash_covers_every_field() -> None:
    base = record()
    for field, value in [
        ("seq", 2),
        ("prev", "1" * 64),
        ("ts", "2026-01-01T00:00:01.000000Z"),
        ("principal", "other"),
        ("op", "qmcp.Kill"),
        ("targets", ["other"]),
        ("decision", "refused"),
        ("outcome", "failed"),
        ("code", "not-found"),
        ("request_id", "r2"),
        ("detail", {"size": 2}),
    ]:
        assert record(**{field: value}).hash != base.hash, field


NONCANONICAL = {
    "added-space": lambda s: s.replace(b'"seq":1', b'"seq": 1'),
    "escaped-ascii": lambda s: s.replace(b'"qmcp.Start"', b'"qmcp\\u002eStart"'),
    "reordered-keys": lambda s: json.dumps(json.loads(s)).encode(),
    "duplicate-key": lambda s: s[:-1] + b',"seq":1}',
    "float-seq": lambda s: s.replace(b'"seq":1', b'"seq":1.0'),
    "bool-seq": lambda s: s.replace(b'"seq":1', b'"seq":true'),
    "extra-field": lambda s: s[:-1] + b',"x":1}',
    "uppercase-hash": lambda s: re.sub(rb'(?<="hash":")[0-9a-f]{64}', lambda m: m[0].upper(), s),
    "nan": lambda s: s.replace(b'"seq":1', b'"seq":NaN'),
    "not-utf8": lambda s: s.replace(b"work-agent", b"work-\xffgent"),
    "unknown-detail-key": lambda s: s.replace(b'"size":1', b'"secret":1'),
}


@pytest.mark.parametrize("mutate", NONCANONICAL.values(), ids=NONCANONICAL.keys())
def test_a_line_must_be_byte_for_byte_canonical(mutate) -> None:  # type: ignore[no-untyped-def]
    line = record().line()[:-1]
    mutated = mutate(line)
    assert mutated != line
    with pytest.raises(RecordError):
        parse_line(mutated)


@settings(max_examples=150, deadline=None)
@given(
    principal=st.text(max_size=300),
    targets=st.lists(st.text(max_size=40) | st.binary(max_size=40), max_size=12),
    detail=st.dictionaries(
        st.sampled_from(sorted(DETAIL_KEYS)) | st.text(max_size=10),
        st.none() | st.booleans() | st.integers() | st.text(max_size=300) | st.binary(),
        max_size=8,
    ),
)
def test_any_caller_values_round_trip_through_one_line(
    principal: str, targets: list[object], detail: dict[str, object]
) -> None:
    rec = record(principal=principal, targets=targets, detail=detail)
    line = rec.line()
    assert line.count(b"\n") == 1
    assert parse_line(line[:-1]) == rec


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_line_rejects_garbage_with_record_error_only(data: bytes) -> None:
    with pytest.raises(RecordError):
        parse_line(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changing_any_byte_of_a_line_is_caught(data: st.DataObject) -> None:
    line = record(detail={"source": "a", "size": 5}).line()[:-1]
    index = data.draw(st.integers(0, len(line) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != line[index]))
    with pytest.raises(RecordError):
        parse_line(line[:index] + bytes([new]) + line[index + 1 :])


def test_anchor_round_trip_and_strictness() -> None:
    anchor = Anchor(5, "a" * 64, 2, "b" * 64)
    assert parse_anchor(anchor.encode()) == anchor
    for bad in [
        anchor.encode()[:-1],
        anchor.encode().replace(b'"seq":5', b'"seq": 5'),
        anchor.encode().replace(b'"seq":5', b'"seq":-1'),
        b"",
        b"\x00" * 200 + b"\n",
    ]:
        with pytest.raises(RecordError):
            parse_anchor(bad)
