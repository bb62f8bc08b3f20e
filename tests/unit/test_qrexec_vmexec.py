"""qubes.VMExec argument encoding (CAC ``encode_for_vmexec``) and its strict decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.sim.vm_files.vmexec import DecodeError, decode_args, encode_args


@pytest.mark.parametrize(
    ("args", "encoded"),
    [
        pytest.param([b"ls", b"-la"], "ls+--la", id="dash-doubled"),
        pytest.param([b"echo", b"a b"], "echo+a-20b", id="space-hex"),
        pytest.param([b"sh", b"-c", b"x;y"], "sh+--c+x-3By", id="semicolon-hex"),
        pytest.param([b"/bin/true"], "-2Fbin-2Ftrue", id="slash-hex"),
        pytest.param([b"a+b"], "a-2Bb", id="plus-hex-not-a-separator"),
    ],
)
def test_encoding_matches_qubesadmin(args: list[bytes], encoded: str) -> None:
    assert encode_args(args) == encoded
    assert decode_args(encoded.encode()) == args


@pytest.mark.parametrize(
    "untrusted",
    [
        pytest.param(b"", id="empty-command"),
        pytest.param(b"ls+-2", id="truncated-escape"),
        pytest.param(b"ls+-zz", id="non-hex-escape"),
        pytest.param(b"ls+-2f", id="lower-case-hex"),
        pytest.param(b"ls+a b", id="raw-space"),
        pytest.param(b"ls+-00", id="nul-byte"),
        pytest.param(b"+ls", id="empty-first-word"),
    ],
)
def test_malformed_arguments_refused(untrusted: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_args(untrusted)


@given(st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b), min_size=1))
def test_round_trip(args: list[bytes]) -> None:
    assert decode_args(encode_args(args).encode()) == args
