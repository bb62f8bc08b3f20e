"""The qfile (qubes.Filecopy) stream: name rules, hostile streams, round trips."""

from __future__ import annotations

import errno
import io
import os
import stat
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_mcp.sim.vm_files import qfile


def header(name: bytes, mode: int, filelen: int, *, mtime: int = 1_700_000_000) -> bytes:
    return qfile.FILE_HEADER.pack(len(name) + 1, mode, filelen, mtime, 0, mtime, 0) + name + b"\0"


END = qfile.FILE_HEADER.pack(0, 0, 0, 0, 0, 0, 0)
REG = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
LNK = stat.S_IFLNK | 0o777


def unpack(dest: Path, stream: bytes, **kw: int) -> tuple[int, qfile.Result | None]:
    out = io.BytesIO()
    cwd = os.getcwd()
    os.chdir(dest)
    try:
        code = qfile.Unpacker(**kw).unpack(io.BytesIO(stream), out)
    finally:
        os.chdir(cwd)
    return code, qfile.parse_result(out.getvalue())


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        pytest.param(b"file.txt", True, id="plain"),
        pytest.param(b"dir/file", True, id="nested"),
        pytest.param("résumé.pdf".encode(), True, id="printable-utf8"),
        pytest.param(b"../escape", False, id="dotdot-escape"),
        pytest.param(b"a/../../b", False, id="dotdot-in-middle"),
        pytest.param(b"/etc/passwd", False, id="absolute"),
        pytest.param(b"a//b", False, id="double-slash"),
        pytest.param(b"./a", False, id="dot-component"),
        pytest.param(b"a/", False, id="trailing-slash"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"evil\x1b[31m", False, id="terminal-escape"),
        pytest.param(b"new\nline", False, id="newline"),
        pytest.param(b"\xff\xfe", False, id="invalid-utf8"),
        pytest.param("rtl\u202eexe.txt".encode(), False, id="bidi-override"),
    ],
)
def test_file_name_rules(name: bytes, ok: bool) -> None:
    assert (qfile.validate_file_name(name) == 0) is ok


@pytest.mark.parametrize(
    ("name", "target", "code"),
    [
        pytest.param(b"a/b", b"c", 0, id="sibling-ok"),
        pytest.param(b"a/b/c", b"../d", 0, id="up-one-inside-top-ok"),
        pytest.param(b"a/b", b"../c", errno.ENOLINK, id="escapes-top-dir"),
        pytest.param(b"a", b"b", errno.ENOLINK, id="top-level-link"),
        pytest.param(b"a/b", b"/etc/passwd", errno.ENOLINK, id="absolute-target"),
        pytest.param(b"a/b/c", b"../../d", errno.ENOLINK, id="escapes-by-two"),
    ],
)
def test_symlink_rules(name: bytes, target: bytes, code: int) -> None:
    assert qfile.validate_symlink(name, target) == code


def test_round_trip_tree_with_directory_and_symlink(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_bytes(b"data" * 50000)
    (src / "d" / "e" / "f").chmod(0o600)
    (src / "d" / "e" / "l").symlink_to("f")
    sent = io.BytesIO()
    packer = qfile.Packer(sent.write)
    cwd = os.getcwd()
    os.chdir(src)
    try:
        packer.walk(b"d")
        packer.end()
    finally:
        os.chdir(cwd)
    dest = tmp_path / "dest"
    dest.mkdir()
    code, result = unpack(dest, sent.getvalue())
    assert code == 0
    assert qfile.result_error(result, packer.crc) is None
    assert (dest / "d" / "e" / "f").read_bytes() == b"data" * 50000
    assert stat.S_IMODE((dest / "d" / "e" / "f").stat().st_mode) == 0o600
    assert os.readlink(dest / "d" / "e" / "l") == "f"
    assert packer.crc == zlib.crc32(sent.getvalue())


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        pytest.param(header(b"../x", REG, 1) + b"x" + END, errno.EILSEQ, id="dotdot-file"),
        pytest.param(header(b"/tmp/x", REG, 1) + b"x" + END, errno.EILSEQ, id="absolute-file"),
        pytest.param(
            header(b"d", DIR, 0) + header(b"d/l", LNK, 6) + b"../../" + END,
            errno.ENOLINK,
            id="symlink-out-of-incoming",
        ),
        pytest.param(header(b"l", LNK, 4) + b"/etc" + END, errno.ENOLINK, id="top-level-symlink"),
        pytest.param(header(b"dev", stat.S_IFCHR | 0o666, 0) + END, errno.EINVAL, id="device-node"),
        pytest.param(header(b"f", REG, 100) + b"short", qfile.LEGAL_EOF, id="truncated-content"),
        pytest.param(header(b"f", REG, 1) + b"x", errno.EREMOTEIO, id="no-end-marker"),
        pytest.param(
            qfile.FILE_HEADER.pack(qfile.MAX_PATH_LENGTH, REG, 0, 0, 0, 0, 0),
            errno.ENAMETOOLONG,
            id="name-too-long",
        ),
        pytest.param(
            qfile.FILE_HEADER.pack(2, REG, 0, 0, 2_000_000_000, 0, 0) + b"f\0" + END,
            errno.EINVAL,
            id="nanoseconds-out-of-range",
        ),
        pytest.param(
            header(b"f", REG, 1) + b"x" + header(b"f", REG, 1) + b"y" + END,
            errno.EEXIST,
            id="overwrite-existing",
        ),
    ],
)
def test_hostile_streams_refused_with_qubes_error_code(
    tmp_path: Path, stream: bytes, code: int
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "in"
    dest.mkdir()
    got, result = unpack(dest, stream)
    assert got == code
    assert result is not None and result.error_code == code
    assert tree(outside) == []  # nothing escaped the incoming directory
    assert not (tmp_path / "x").exists()


def test_existing_symlink_in_incoming_is_not_followed(tmp_path: Path) -> None:
    dest = tmp_path / "in"
    dest.mkdir()
    (tmp_path / "victim").mkdir()
    (dest / "d").symlink_to(tmp_path / "victim")
    code, _ = unpack(dest, header(b"d/f", REG, 1) + b"x" + END)
    assert code in {errno.ELOOP, errno.ENOTDIR}
    assert list((tmp_path / "victim").iterdir()) == []


def test_byte_quota_refuses_oversized_file(tmp_path: Path) -> None:
    code, _ = unpack(tmp_path, header(b"big", REG, 11) + b"x" * 11 + END, bytes_limit=10)
    assert code == errno.EDQUOT
    assert not (tmp_path / "big").exists()


def test_crc_mismatch_is_reported_by_sender() -> None:
    result = qfile.Result(0, 1234, b"f")
    assert qfile.result_error(result, 999) == "File transfer failed: checksum mismatch"


def test_sender_messages_sanitise_remote_names() -> None:
    msg = qfile.result_error(qfile.Result(errno.EEXIST, 0, b'a"\x1bb'), 0)
    assert msg == 'A file named "a__b" already exists in QubesIncoming dir'


def test_old_receiver_without_extension_is_understood() -> None:
    result = qfile.parse_result(qfile.RESULT_HEADER.pack(0, 0, 7))
    assert result == qfile.Result(0, 7, b"")


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_random_streams_never_crash_or_escape(tmp_path: Path, data: bytes) -> None:
    dest = tmp_path / "fuzz"
    dest.mkdir(exist_ok=True)
    for p in sorted(dest.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    code, result = unpack(dest, data)
    assert result is not None
    assert result.error_code == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz"]
