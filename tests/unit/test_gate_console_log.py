"""``qube.log``'s reading: only the tail is read, a cut first line is dropped, every byte
that is not printable ASCII is escaped, and a path that is not a regular file is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qubes_mcp.dom0.handlers_read import _tail, escape_log_line


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"plain text", "plain text"),
        (b"\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),  # terminal escapes
        (b"back\\slash", "back\\\\slash"),  # so an escape cannot be forged
        (b"\\x41", "\\\\x41"),
        (b"cr\rover", "cr\\x0dover"),
        (b"tab\t", "tab\\x09"),
        (b"\xe2\x80\xae rtl", "\\xe2\\x80\\xae rtl"),  # bidi override, as bytes
        (b"\xff\xfe", "\\xff\\xfe"),  # not UTF-8
        (b"\x00nul", "\\x00nul"),
    ],
)
def test_escape(raw: bytes, shown: str) -> None:
    assert escape_log_line(raw) == shown


def test_tail_reads_no_more_than_the_cap(tmp_path: Path) -> None:
    log = tmp_path / "guest-x.log"
    log.write_bytes(b"a" * 10_000 + b"\nlast line\n")
    data, size = _tail(log, 1024)
    assert len(data) == 1024 and size == 10_011
    assert data.endswith(b"\nlast line\n")


def test_tail_of_a_small_file_is_the_whole_file(tmp_path: Path) -> None:
    log = tmp_path / "guest-x.log"
    log.write_bytes(b"one\ntwo\n")
    assert _tail(log, 1024) == (b"one\ntwo\n", 8)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("dom0 secret")
    (tmp_path / "guest-x.log").symlink_to(secret)
    with pytest.raises(OSError):
        _tail(tmp_path / "guest-x.log", 1024)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "guest-x.log")
    with pytest.raises(OSError):
        _tail(tmp_path / "guest-x.log", 1024)
