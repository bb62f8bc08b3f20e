"""Device protocol strings: qrexec argument form and ``key='value'`` serialization (R4.3)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.sim.device_wire import KEY_CHARS, VALUE_CHARS, DeviceRef, pack, quote, unpack
from qubes_mcp.sim.exc import ProtocolError

# Arguments from qubesd's and qubesadmin's tests (api_admin test_480/484/496, CAC devices).
QARGS = {
    "full-id": ("test-vm1+1234+0000+0000++t000000", ("test-vm1", "1234", "0000:0000::t000000")),
    "unknown-interface": (
        "test-vm1+1234+0000+0000++_______",
        ("test-vm1", "1234", "0000:0000::?******"),
    ),
    "any-device-on-port": ("test-vm2+dev1+_", ("test-vm2", "dev1", "*")),
    "no-device-id": ("test-vm1+1234", ("test-vm1", "1234", "*")),
    "block-whole-disk": ("sys-usb+sda++None", ("sys-usb", "sda", ":None")),
    "block-partition": ("sys-usb+sda1++None+1", ("sys-usb", "sda1", ":None:1")),
    "any-backend": ("_+sda+_", ("*", "sda", "*")),
    "any-port": ("sys-usb+_++None", ("sys-usb", "*", ":None")),
}


@pytest.mark.parametrize(("arg", "expected"), QARGS.values(), ids=QARGS.keys())
def test_qarg_parses_like_qubesd(arg: str, expected: tuple[str, str, str]) -> None:
    ref = DeviceRef.from_qarg(arg)
    assert (ref.backend, ref.port_id, ref.device_id) == expected


@pytest.mark.parametrize(
    ("arg", "canonical"),
    [
        ("test-vm1+1234+0000+0000++_______", "test-vm1+1234+0000+0000++_______"),
        ("test-vm2+dev1+_", "test-vm2+dev1+_"),
        ("test-vm1+1234", "test-vm1+1234+_"),
        ("sys-usb+sda1++None+1", "sys-usb+sda1++None+1"),
    ],
)
def test_qarg_renders_like_qubesadmin(arg: str, canonical: str) -> None:
    assert DeviceRef.from_qarg(arg).qarg() == canonical


@pytest.mark.parametrize("arg", ["", "sys-usb", "sda"], ids=["empty", "backend-only", "no-plus"])
def test_qarg_without_plus_is_refused(arg: str) -> None:
    with pytest.raises(ValueError, match="unpack"):
        DeviceRef.from_qarg(arg)


def test_pack_escapes_quotes_in_qubesd_order() -> None:
    assert pack([("device_id", "*"), ("name", "it's"), ("_opt", "a b")]) == (
        "device_id='*' name='it\\'s' _opt='a b'"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("bad key", "v"), ("k=", "v"), ("k'", "v"), ("k", "caf\u00e9"), ("k", "new\nline")],
    ids=["space-in-key", "equals-in-key", "quote-in-key", "non-ascii-value", "newline-value"],
)
def test_pack_refuses_characters_outside_the_protocol(key: str, value: str) -> None:
    with pytest.raises(ProtocolError):
        pack([(key, value)])


UNPACKED = {
    # the payload qubesadmin sends for an attach (CAC tests/devices.py)
    "client-attach": (
        b"device_id='*' port_id='dev1' devclass='test' backend_domain='test-vm2' "
        b"mode='manual' frontend_domain='test-vm'",
        {
            "device_id": "*",
            "port_id": "dev1",
            "devclass": "test",
            "backend_domain": "test-vm2",
            "mode": "manual",
            "frontend_domain": "test-vm",
        },
        {},
    ),
    "options-underscore": (b"_option1='value2'", {}, {"option1": "value2"}),
    "empty": (b"", {}, {}),
    "whitespace-only": (b"  \n", {}, {}),
    "escaped-quote": (b"name='it\\'s' k='v'", {"name": "it's", "k": "v"}, {}),
    "value-with-spaces-and-equals": (b"a='x = y' b='1'", {"a": "x = y", "b": "1"}, {}),
    "repeated-key-last-wins": (b"mode='manual' mode='required'", {"mode": "required"}, {}),
    "no-quotes-at-all": (b"foo", {"foo": ""}, {}),
}


@pytest.mark.parametrize(("payload", "props", "opts"), UNPACKED.values(), ids=UNPACKED.keys())
def test_unpack_matches_qubesd(payload: bytes, props: dict[str, str], opts: dict[str, str]) -> None:
    assert unpack(payload) == (props, opts)


HOSTILE = {
    "non-ascii": "name='café'".encode(),
    "space-in-key": b"bad key='v'",
    "quote-in-key": b"k\"='v'",
    "newline-in-value": b"a='x\ny' b='z'",
    "nul-in-value": b"a='\x00'",
    "tab-in-value": b"a='\t' b='1'",
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_unpack_refuses_hostile_payload(payload: bytes) -> None:
    with pytest.raises((ProtocolError, UnicodeDecodeError)):
        unpack(payload)


_keys = st.text(sorted(KEY_CHARS - {"_"}), min_size=1, max_size=8)
_values = st.text(sorted(VALUE_CHARS - {"\\"}), max_size=12).filter(
    lambda v: "='" not in quote(v)[1:] and "' " not in quote(v)
)


@given(st.dictionaries(_keys, _values, max_size=5))
def test_unpack_of_pack_is_identity(props: dict[str, str]) -> None:
    # Values that would contain the separators qubesd splits on are excluded: the format
    # itself cannot carry them.
    assert unpack(pack(list(props.items())).encode()) == (props, {})


@given(st.binary(max_size=80))
def test_random_payload_raises_only_protocol_errors(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError, UnicodeDecodeError):
        unpack(payload)


@given(st.text("ab_+*:?-", max_size=20))
def test_random_qarg_raises_only_value_error(arg: str) -> None:
    try:
        ref = DeviceRef.from_qarg(arg)
    except ValueError:
        return
    # qubesd's mapping is lossy ("*" and "_" collide) but stable after one round.
    canonical = ref.qarg()
    assert DeviceRef.from_qarg(canonical).qarg() == canonical
