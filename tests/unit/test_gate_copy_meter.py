"""dom0's view of a relayed qfile stream: it must frame entries exactly as the receiver does,
so what it counts is what lands, and refuse the entry that crosses a cap before forwarding it.

Streams are produced by the emulator's own sender (the same packer ``qfile-agent`` uses) and
checked against the emulator's receiver, so framing agreement is tested, not assumed.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from qubes_mcp.dom0.copy import (
    FILE_HEADER,
    CopyAbort,
    CopyLimits,
    CopyOutcome,
    StreamMeter,
    failure_message,
    failure_reason,
)
from qubes_mcp.sim.vm_files.qfile import Packer, Unpacker


def pack(tmp_path: Path, *names: str) -> bytes:
    out = bytearray()
    packer = Packer(out.extend)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name in names:
            packer.walk(name.encode())
        packer.end()
    finally:
        os.chdir(cwd)
    return bytes(out)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "a.txt").write_bytes(b"alpha")
    (src / "d" / "e" / "b.bin").write_bytes(bytes(range(256)) * 3)
    (src / "d" / "link").symlink_to("a.txt")
    (src / "top").write_bytes(b"x" * 10)
    return src


def header(namelen: int, mode: int, filelen: int) -> bytes:
    return FILE_HEADER.pack(namelen, mode, filelen, 0, 0, 0, 0)


END = header(0, 0, 0)


def test_counts_what_lands_whole_and_byte_by_byte(tree: Path, tmp_path: Path) -> None:
    stream = pack(tree, "d", "top")
    whole = StreamMeter(1 << 20, 100)
    whole.feed(stream)
    split = StreamMeter(1 << 20, 100)
    for i in range(len(stream)):
        split.feed(stream[i : i + 1])
    # d, d/e (each once, though sent twice), a.txt, b.bin, link, top
    assert (whole.files, whole.bytes, whole.ended) == (6, 5 + 768 + 5 + 10, True)
    assert (split.files, split.bytes, split.ended) == (whole.files, whole.bytes, True)
    dest = tmp_path / "dest"
    dest.mkdir()
    os.chdir(dest)
    try:
        assert Unpacker().unpack(io.BytesIO(stream), io.BytesIO()) == 0
    finally:
        os.chdir(tmp_path)
    landed = sum(1 for _ in dest.rglob("*"))
    assert landed == whole.files


@pytest.mark.parametrize("cap", [0, 5, 772, 787])
def test_the_byte_cap_refuses_the_crossing_entry_and_keeps_what_came_before(
    tree: Path, cap: int
) -> None:
    stream = pack(tree, "d", "top")
    meter = StreamMeter(cap, 100)
    with pytest.raises(CopyAbort) as caught:
        meter.feed(stream)
    assert caught.value.what == "bytes"
    assert meter.bytes <= cap
    # the usable prefix is exactly the entries before the crossing one, and re-metering it
    # under the same cap succeeds
    again = StreamMeter(cap, 100)
    again.feed(stream[: caught.value.usable])
    assert (again.files, again.bytes) == (meter.files, meter.bytes)


def test_exactly_at_the_caps_is_allowed(tree: Path) -> None:
    stream = pack(tree, "d", "top")
    meter = StreamMeter(788, 6)
    meter.feed(stream)
    assert (meter.files, meter.bytes, meter.ended) == (6, 788, True)


def test_the_file_cap(tree: Path) -> None:
    meter = StreamMeter(1 << 20, 5)
    with pytest.raises(CopyAbort) as caught:
        meter.feed(pack(tree, "d", "top"))
    assert (caught.value.what, meter.files) == ("files", 5)


def test_a_sender_repeating_one_directory_is_stopped() -> None:
    """Repeats of a known directory count no new entry, so the header count bounds them."""
    name = b"d\0"
    meter = StreamMeter(1 << 20, 5)
    with pytest.raises(CopyAbort) as caught:
        meter.feed((header(len(name), stat.S_IFDIR | 0o755, 0) + name) * 11)
    assert (caught.value.what, meter.files) == ("files", 1)


def test_a_directory_announcing_content_does_not_hide_entries() -> None:
    """The receiver reads no content for a directory, so neither may dom0: a directory header
    claiming 1,000 bytes of content must not swallow the next entries from the count."""
    name = b"d\0"
    inner = b"d/x\0"
    stream = (
        header(len(name), stat.S_IFDIR | 0o755, 1000)
        + name
        + header(len(inner), stat.S_IFREG | 0o644, 3)
        + inner
        + b"abc"
        + END
    )
    meter = StreamMeter(1 << 20, 100)
    meter.feed(stream)
    assert (meter.files, meter.bytes, meter.ended) == (2, 3, True)


@pytest.mark.parametrize(
    "bad",
    [
        header(2, stat.S_IFIFO | 0o644, 0) + b"p\0",  # a type the receiver refuses
        header(2, stat.S_IFCHR | 0o644, 0) + b"c\0",
        header(16384, stat.S_IFREG | 0o644, 0),  # a name the receiver refuses
        header(2, stat.S_IFLNK | 0o777, 16384) + b"l\0",  # a link target it refuses
        END + b"trailing",  # nothing is read after the end marker
    ],
)
def test_protocol_violations_abort(bad: bytes) -> None:
    with pytest.raises(CopyAbort) as caught:
        StreamMeter(1 << 30, 100).feed(bad)
    assert caught.value.what == "protocol"


def _outcome(**changes: object) -> CopyOutcome:
    base: dict[str, object] = {
        "files": 1,
        "content_bytes": 1,
        "stream_bytes": 1,
        "ended": True,
        "answer": None,
        "crc": 7,
        "sender_exit": 0,
        "receiver_exit": 0,
        "aborted": "",
        "sender_stderr": b"",
        "receiver_stderr": b"",
    }
    base.update(changes)
    return CopyOutcome(**base)  # type: ignore[arg-type]


def test_success_needs_the_receivers_confirmation_of_every_byte() -> None:
    from qubes_mcp.dom0.copy import Answer

    limits = CopyLimits(10, 10, 5)
    assert failure_message(_outcome(answer=Answer(0, 7)), limits) is None
    # the sender's own exit code is only its opinion
    assert failure_message(_outcome(answer=Answer(0, 7), sender_exit=1), limits) is None
    assert "different bytes" in str(failure_message(_outcome(answer=Answer(0, 8)), limits))
    assert "did not confirm" in str(failure_message(_outcome(), limits))
    assert "does not exist" in str(failure_message(_outcome(ended=False), limits))
    assert failure_reason(_outcome(answer=Answer(17, 7))) == "copy refused by the receiver: EEXIST"
    assert failure_reason(_outcome(aborted="files")) == "copy stopped: files"
    assert failure_reason(_outcome(ended=False, sender_exit=1)) == (
        "copy sender stopped before the end (exit 1)"
    )
    # qube-chosen text never reaches the message
    told = failure_message(_outcome(answer=Answer(5, 7), receiver_stderr=b"\x1b[2Jpwned"), limits)
    assert told == "the copy failed: the destination qube refused the files"
