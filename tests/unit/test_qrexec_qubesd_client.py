"""Decoding qubesd's replies and event stream (qubes-internals §1.4)."""

from __future__ import annotations

import pytest

from qubes_mcp.sim.qrexec.qubesd_client import (
    Event,
    QubesdError,
    QubesdUnavailableError,
    _split_event,
    parse_reply,
)


def test_ok_reply_returns_content() -> None:
    assert parse_reply(b"0\0uuid:1234") == b"uuid:1234"


def test_exception_reply_carries_wire_class_and_message() -> None:
    with pytest.raises(QubesdError) as exc:
        parse_reply(b"2\0QubesVMNotHaltedError\0\0Domain is running: 'work'\0")
    assert exc.value.exc_class == "QubesVMNotHaltedError"
    assert exc.value.message == "Domain is running: 'work'"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"", id="silent-refusal"),
        pytest.param(b"9\0x", id="unknown-type"),
        pytest.param(b"2\0OnlyClass", id="truncated-exception"),
    ],
)
def test_unusable_replies(reply: bytes) -> None:
    with pytest.raises(QubesdUnavailableError):
        parse_reply(reply)


def test_events_split_with_empty_subject_and_kwargs() -> None:
    stream = (
        b"1\0\0connection-established\0\0"
        b"1\0work\0domain-start\0start_guid\0True\0\0"
        b"1\0\0domain-delete\0vm\0disp12\0\0"
        b"1\0wo"
    )
    events = []
    while True:
        event, stream = _split_event(stream)
        if event is None:
            break
        events.append(event)
    assert events == [
        Event("", "connection-established", {}),
        Event("work", "domain-start", {"start_guid": "True"}),
        Event("", "domain-delete", {"vm": "disp12"}),
    ]
    assert stream == b"1\0wo"  # incomplete message kept for the next read


def test_event_with_empty_value() -> None:
    event, rest = _split_event(b"1\0work\0property-set:x\0name\0x\0newvalue\0\0\0")
    assert event == Event("work", "property-set:x", {"name": "x", "newvalue": ""})
    assert rest == b""


def test_non_event_in_stream_is_an_error() -> None:
    with pytest.raises(QubesdUnavailableError):
        _split_event(b"2\0QubesException\0\0boom\0")
