"""The ``qubes.Filecopy`` stream (qfile protocol), both ends, standard library only.

Facts from qubes-linux-utils ``qrexec-lib`` (``libqubes-rpc-filecopy.h``, ``pack.c``,
``unpack.c``, ``unicode.c``): the sender writes, per file, a 32-byte little-endian
``file_header`` (namelen u32, mode u32, filelen u64, atime, atime_nsec, mtime, mtime_nsec
u32), the name (``namelen`` bytes including a terminating NUL), then the content (regular
file) or the link target (symlink); a directory is sent before and again after its entries
(the second time fixes its mode and times). A header with ``namelen == 0`` ends the transfer.
The receiver answers once with ``result_header`` (error_code u32, pad u32, crc32 u64), followed
by ``result_header_ext`` (last_namelen u32 + name). The CRC is the standard CRC-32 over every
byte the sender wrote. Error codes are errno values; ``LEGAL_EOF`` marks a sender that stopped
mid-file.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import unicodedata
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

FILE_HEADER = struct.Struct("<IIQIIII")
RESULT_HEADER = struct.Struct("<IIQ")
RESULT_EXT = struct.Struct("<I")
MAX_PATH_LENGTH = 16384
LEGAL_EOF = 31415926
MAX_NSEC = 999_999_999

ALLOW_SYMLINKS = 1 << 0
ALLOW_DIRECTORIES = 1 << 1
DEFAULT_FLAGS = ALLOW_SYMLINKS | ALLOW_DIRECTORIES

_CHUNK = 65536


# --- name validation (our reading of unicode.c validate_path) --------------------------------


def _char_safe(ch: str) -> bool:
    # Approximates Qubes' generated allowlist of code points safe for display: no controls,
    # format characters, surrogates, private use, unassigned, or non-ASCII spacing/separators.
    return unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def _component_safe(untrusted_component: bytes) -> bool:
    if all(0x20 <= b <= 0x7E for b in untrusted_component):
        return True
    try:
        text = untrusted_component.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    return all(0x20 <= ord(ch) <= 0x7E or _char_safe(ch) for ch in text)


def validate_path(
    untrusted_name: bytes, allowed_leading_dotdot: int = 0, *, allow_trailing_slash: bool = False
) -> int:
    """Number of non-``..`` components, or a negative errno (``-ENOLINK`` / ``-EILSEQ``)."""
    if not untrusted_name:
        return -errno.ENOLINK
    if untrusted_name.startswith(b"/"):
        return -errno.ENOLINK
    parts = untrusted_name.split(b"/")
    trailing = parts[-1] == b""
    if trailing:
        parts = parts[:-1]
    count = 0
    for part in parts:
        if part in {b"", b"."}:
            return -errno.EILSEQ
        if part == b"..":
            if allowed_leading_dotdot < 1:
                return -errno.ENOLINK
            allowed_leading_dotdot -= 1
            continue
        allowed_leading_dotdot = 0
        count += 1
        if not _component_safe(part):
            return -errno.EILSEQ
    if trailing and not allow_trailing_slash:
        return -errno.EILSEQ
    return count


def validate_file_name(untrusted_name: bytes) -> int:
    """0 when the name may be created under the incoming directory, else an errno."""
    return 0 if validate_path(untrusted_name) > 0 else errno.EILSEQ


def validate_symlink(untrusted_name: bytes, untrusted_target: bytes) -> int:
    """0 when the link stays inside its top-level entry (``a/b`` → ``c`` yes, ``../c`` no)."""
    depth = validate_path(untrusted_name)
    if depth < 0:
        return errno.EILSEQ
    if depth < 2:
        return errno.ENOLINK
    res = validate_path(untrusted_target, depth - 2, allow_trailing_slash=True)
    return -res if res < 0 else 0


# --- receiver ---------------------------------------------------------------------------------


class _Abort(Exception):  # noqa: N818 - internal control flow, never escapes this module
    def __init__(self, code: int, name: bytes | None) -> None:
        super().__init__(code)
        self.code = code
        self.name = name


class _CrcReader:
    """Reads exact byte counts from the sender and keeps the running CRC of what it read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.crc = 0

    def read_exact(self, count: int) -> bytes | None:
        chunks: list[bytes] = []
        remaining = count
        while remaining:
            chunk = self.stream.read(remaining)
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        self.crc = zlib.crc32(data, self.crc)
        return data


def _open_parent(untrusted_name: bytes) -> tuple[int, bytes]:
    """Open the parent directory of a validated name, refusing symlinks on every component."""
    *dirs, last = untrusted_name.split(b"/")
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in dirs:
            new_fd = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOCTTY, dir_fd=fd
            )
            os.close(fd)
            fd = new_fd
    except OSError as exc:
        os.close(fd)
        raise _Abort(exc.errno or errno.EIO, part) from None
    return fd, last


def _fix_times_and_mode(fd: int, hdr: tuple[int, ...], name: bytes) -> None:
    _namelen, mode, _filelen, atime, atime_nsec, mtime, mtime_nsec = hdr
    if atime_nsec > MAX_NSEC or mtime_nsec > MAX_NSEC:
        raise _Abort(errno.EINVAL, name)
    try:
        os.fchmod(fd, mode & 0o7777)
        os.utime(fd, ns=(atime * 10**9 + atime_nsec, mtime * 10**9 + mtime_nsec))
    except OSError as exc:
        raise _Abort(exc.errno or errno.EIO, name) from None


class Unpacker:
    """Receives a qfile stream into the current directory (the caller chdirs first)."""

    def __init__(
        self, flags: int = DEFAULT_FLAGS, *, bytes_limit: int = 0, files_limit: int = 0
    ) -> None:
        self.flags = flags
        self.bytes_limit = bytes_limit
        self.files_limit = files_limit
        self.total_bytes = 0
        self.total_files = 0

    def _regular(self, rd: _CrcReader, hdr: tuple[int, ...], name: bytes) -> None:
        code = validate_file_name(name)
        if code:
            raise _Abort(code, name)
        filelen = hdr[2]
        if self.bytes_limit and (
            filelen > self.bytes_limit or self.total_bytes > self.bytes_limit - filelen
        ):
            raise _Abort(errno.EDQUOT, name)
        dirfd, last = _open_parent(name)
        try:
            try:
                fd = os.open(
                    last,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NOCTTY,
                    0,
                    dir_fd=dirfd,
                )
            except OSError as exc:
                raise _Abort(exc.errno or errno.EIO, name) from None
        finally:
            os.close(dirfd)
        try:
            self.total_bytes += filelen
            remaining = filelen
            while remaining:
                chunk = rd.read_exact(min(remaining, _CHUNK))
                if chunk is None:
                    raise _Abort(LEGAL_EOF, name)
                os.write(fd, chunk)
                remaining -= len(chunk)
            _fix_times_and_mode(fd, hdr, name)
        finally:
            os.close(fd)

    def _directory(self, hdr: tuple[int, ...], name: bytes) -> None:
        code = validate_file_name(name)
        if code:
            raise _Abort(code, name)
        dirfd, last = _open_parent(name)
        try:
            try:
                os.mkdir(last, 0o700, dir_fd=dirfd)
                return  # first time: keep rwx so the entries can be written
            except FileExistsError:
                pass
            except OSError as exc:
                raise _Abort(exc.errno or errno.EIO, name) from None
            try:
                fd = os.open(last, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=dirfd)
            except OSError as exc:
                raise _Abort(exc.errno or errno.EIO, name) from None
            try:
                _fix_times_and_mode(fd, hdr, name)
            finally:
                os.close(fd)
        finally:
            os.close(dirfd)

    def _symlink(self, rd: _CrcReader, hdr: tuple[int, ...], name: bytes) -> None:
        filelen = hdr[2]
        if filelen > MAX_PATH_LENGTH - 1:
            raise _Abort(errno.ENAMETOOLONG, name)
        self.total_bytes += filelen
        if self.bytes_limit and self.total_bytes > self.bytes_limit:
            raise _Abort(errno.EDQUOT, name)
        untrusted_target = rd.read_exact(filelen)
        if untrusted_target is None:
            raise _Abort(LEGAL_EOF, name)
        untrusted_target = untrusted_target.split(b"\0", 1)[0]
        code = validate_symlink(name, untrusted_target)
        if code:
            raise _Abort(code, untrusted_target)
        dirfd, last = _open_parent(name)
        try:
            os.symlink(untrusted_target, last, dir_fd=dirfd)
        except OSError as exc:
            raise _Abort(exc.errno or errno.EIO, name) from None
        finally:
            os.close(dirfd)

    def unpack(self, inp: BinaryIO, out: BinaryIO) -> int:
        """Receive until the end marker; write the result header; return the error code."""
        rd = _CrcReader(inp)
        last_name = b""
        code = 0
        try:
            while True:
                raw = rd.read_exact(FILE_HEADER.size)
                if raw is None:
                    code = errno.EREMOTEIO  # stream ended without the end-of-transfer marker
                    break
                hdr = FILE_HEADER.unpack(raw)
                namelen, mode = hdr[0], hdr[1]
                if namelen == 0:
                    break
                self.total_files += 1
                if self.files_limit and self.total_files > self.files_limit:
                    raise _Abort(errno.EDQUOT, last_name)
                if namelen > MAX_PATH_LENGTH - 1:
                    raise _Abort(errno.ENAMETOOLONG, None)
                untrusted_raw_name = rd.read_exact(namelen)
                if untrusted_raw_name is None:
                    raise _Abort(LEGAL_EOF, None)
                untrusted_name = untrusted_raw_name.split(b"\0", 1)[0]
                last_name = untrusted_name
                if stat.S_ISREG(mode):
                    self._regular(rd, hdr, untrusted_name)
                elif stat.S_ISLNK(mode) and self.flags & ALLOW_SYMLINKS:
                    self._symlink(rd, hdr, untrusted_name)
                elif stat.S_ISDIR(mode) and self.flags & ALLOW_DIRECTORIES:
                    self._directory(hdr, untrusted_name)
                else:
                    raise _Abort(errno.EINVAL, untrusted_name)
        except _Abort as abort:
            write_result(out, abort.code, rd.crc, abort.name)
            return abort.code
        write_result(out, code, rd.crc, last_name)
        return code


def write_result(out: BinaryIO, code: int, crc: int, last_name: bytes | None) -> None:
    """The receiver's answer: result header, and the extension when a name is known."""
    data = RESULT_HEADER.pack(code & 0xFFFFFFFF, 0, crc)
    if last_name is not None:
        data += RESULT_EXT.pack(len(last_name)) + last_name
    out.write(data)
    out.flush()


# --- sender -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What the receiver answered."""

    error_code: int
    crc: int
    last_name: bytes


def parse_result(untrusted_data: bytes) -> Result | None:
    """Decode the receiver's answer; ``None`` when it sent no complete result header."""
    if len(untrusted_data) < RESULT_HEADER.size:
        return None
    code, _pad, crc = RESULT_HEADER.unpack_from(untrusted_data)
    rest = untrusted_data[RESULT_HEADER.size :]
    name = b""
    if len(rest) >= RESULT_EXT.size:
        (namelen,) = RESULT_EXT.unpack_from(rest)
        name = rest[RESULT_EXT.size : RESULT_EXT.size + min(namelen, MAX_PATH_LENGTH)]
    return Result(code, crc, name)


def _display(untrusted_name: bytes) -> str:
    return "".join("_" if b < 0x20 or b > 0x7E or b == 0x22 else chr(b) for b in untrusted_name)


def result_error(result: Result | None, sent_crc: int) -> str | None:
    """The sender's error message for a result (``pack.c`` wording), or ``None`` if all good."""
    if result is None:
        return "File copy: no result from the receiving qube"
    name = _display(result.last_name)
    prefix = "; Last file: " if name else ""
    code = result.error_code
    if code == errno.EEXIST:
        return f'A file named "{name}" already exists in QubesIncoming dir'
    if code == errno.EINVAL:
        return f'File copy: Corrupted data from packer{prefix}"{name}"'
    if code == errno.EILSEQ:
        return f'Forbidden character in file or link target. Name might look somewhat like "{name}"'
    if code == errno.ENOLINK:
        return f'Cannot verify that link at "{name}" would not be broken by copy'
    if code:
        return f'File copy: "{os.strerror(code)}{prefix}{name}"'
    if result.crc != sent_crc:
        return "File transfer failed: checksum mismatch"
    return None


class Packer:
    """Produces the qfile stream for files and directory trees, tracking the CRC."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self.crc = 0

    def _emit(self, data: bytes) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self._write(data)

    def _header(self, name: bytes, st: os.stat_result, filelen: int) -> None:
        self._emit(
            FILE_HEADER.pack(
                len(name) + 1,
                st.st_mode,
                filelen,
                int(st.st_atime_ns // 10**9) & 0xFFFFFFFF,
                st.st_atime_ns % 10**9,
                int(st.st_mtime_ns // 10**9) & 0xFFFFFFFF,
                st.st_mtime_ns % 10**9,
            )
            + name
            + b"\0"
        )

    def _one(self, name: bytes, st: os.stat_result) -> None:
        if stat.S_ISREG(st.st_mode):
            self._header(name, st, st.st_size)
            with open(name, "rb") as fh:
                remaining = st.st_size
                while remaining:
                    chunk = fh.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise OSError(errno.EIO, f"{name!r} shrank while being sent")
                    self._emit(chunk)
                    remaining -= len(chunk)
        elif stat.S_ISDIR(st.st_mode):
            self._header(name, st, 0)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(name)
            self._header(name, st, len(target))
            self._emit(target)

    def walk(self, name: bytes) -> None:
        """Send ``name`` (relative to the cwd) and, for a directory, everything below it."""
        st = os.lstat(name)
        self._one(name, st)
        if stat.S_ISDIR(st.st_mode):
            for entry in sorted(os.listdir(name)):
                self.walk(name + b"/" + entry)
            self._one(name, st)  # resent so the receiver sets the final mode and times

    def end(self) -> None:
        self._emit(FILE_HEADER.pack(0, 0, 0, 0, 0, 0, 0))
