"""dom0's relay joining the emulated qfile halves as plain local processes (no qubes, no
bwrap): the halves speak the protocol to each other only through ``relay_copy``."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from qubes_mcp.dom0.copy import CopyLimits, CopyOutcome, failure_message, relay_copy

LIMITS = CopyLimits(max_bytes=1 << 20, max_files=20, timeout=30)


def half(module: str, *args: str) -> list[str]:
    code = (
        f"import sys; from qubes_mcp.sim.vm_files import {module} as m;"
        " sys.exit(m.main(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]


def copy(paths: list[str], dest: Path, limits: CopyLimits = LIMITS) -> CopyOutcome:
    return asyncio.run(
        relay_copy(
            half("qfile_agent", "--", *paths),
            half("qfile_unpacker", str(os.getuid()), str(dest)),
            limits,
        )
    )


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "incoming"
    d.mkdir()
    return d


def test_files_and_trees_land_intact(tmp_path: Path, dest: Path) -> None:
    src = tmp_path / "src"
    (src / "tree" / "sub").mkdir(parents=True)
    blob = os.urandom(300_000) + b"\0\xff"
    (src / "tree" / "sub" / "blob").write_bytes(blob)
    (src / "tree" / "link").symlink_to("sub/blob")
    (src / "one").write_text("one\n")
    out = copy([str(src / "tree"), str(src / "one")], dest)
    assert out.ok, out
    assert (dest / "tree" / "sub" / "blob").read_bytes() == blob
    assert os.readlink(dest / "tree" / "link") == "sub/blob"
    assert (dest / "one").read_text() == "one\n"
    assert (out.files, out.content_bytes) == (5, len(blob) + len("sub/blob") + 4)


def test_a_missing_path_fails_after_what_came_before(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "first").write_text("1")
    out = copy([str(tmp_path / "first"), str(tmp_path / "nope")], dest)
    assert not out.ok and not out.ended
    assert failure_message(out, LIMITS) == (
        "the copy failed: a path does not exist or cannot be read in the source qube"
    )


def test_the_byte_cap_keeps_what_fits(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "a").write_bytes(b"a" * 600)
    (tmp_path / "b").write_bytes(b"b" * 600)
    out = copy([str(tmp_path / "a"), str(tmp_path / "b")], dest, CopyLimits(1000, 20, 30))
    assert out.aborted == "bytes"
    assert (dest / "a").read_bytes() == b"a" * 600 and not (dest / "b").exists()


def test_an_existing_name_is_the_receivers_refusal(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "dup").write_text("x")
    (dest / "dup").write_text("already")
    out = copy([str(tmp_path / "dup")], dest)
    assert failure_message(out, LIMITS) == (
        "the copy failed: a file of that name is already in the destination's QubesIncoming "
        "directory"
    )
    assert (dest / "dup").read_text() == "already"


def test_a_destination_that_cannot_be_prepared_stops_the_sender(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")

    async def not_ready() -> bool:
        await asyncio.sleep(0.2)  # the sender is already running, held by the pipe
        return False

    started = asyncio.run(
        relay_copy(
            half("qfile_agent", "--", str(tmp_path / "f")),
            half("qfile_unpacker", str(os.getuid()), str(tmp_path / "never")),
            LIMITS,
            ready=not_ready(),
        )
    )
    assert started.aborted == "prepare" and not started.ok
    assert failure_message(started, LIMITS) == (
        "the copy failed: the destination qube could not prepare its QubesIncoming directory"
    )
