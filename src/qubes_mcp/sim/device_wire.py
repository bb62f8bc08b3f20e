"""The R4.3 device protocol on the wire: qrexec argument forms and ``key='value'`` strings.

Pure functions shared by ``sim.devices``; see R4.3 ``qubes/device_protocol.py`` for the format.

* A device in a qrexec argument is ``<backend>+<port_id>+<device_id>`` with every ``:`` of the
  device id written as ``+``, ``*`` as ``_`` and the unknown interface ``?******`` as seven
  underscores (``sys-usb+sda++None`` is port ``sda``, device id ``:None``).
* A serialization is space-separated ``key='value'`` with ``'`` escaped as ``\\'``; keys that
  start with ``_`` are options. Keys use ``KEY_CHARS``, values ``VALUE_CHARS``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from qubes_mcp.sim.exc import ProtocolError

KEY_CHARS = frozenset(string.digits + string.ascii_letters + "!#$%&()*+,-./:;<>?@[\\]^_{|}~")
VALUE_CHARS = KEY_CHARS | frozenset(string.punctuation + " ")
UNKNOWN_INTERFACE = "?******"
#: Device id a ``DeviceInfo`` reports when it knows nothing about the device.
UNKNOWN_DEVICE_ID = "0000:0000::?******"
ASSIGNMENT_MODES = ("manual", "ask-to-attach", "auto-attach", "required")


@dataclass(frozen=True)
class DeviceRef:
    """A device named by a qrexec argument; ``"*"`` stands for "any" in each field.

    Attributes:
        backend: Backend qube name, or ``"*"``.
        port_id: Port in the backend (``sda``), or ``"*"``.
        device_id: Device identity (``:None``, ``:1``), or ``"*"`` when not given.
    """

    backend: str
    port_id: str
    device_id: str

    @classmethod
    def from_qarg(cls, untrusted_arg: str) -> DeviceRef:
        """Parse ``<backend>+<port_id>[+<device_id>]`` as qubesd does.

        qrexec has already limited the argument's charset; qubesd only splits it.

        Raises:
            ValueError: No ``+`` at all (qubesd fails unpacking; nothing is reported).
        """
        parts = untrusted_arg.split("+", 1)
        if len(parts) != 2:
            raise ValueError(f"not enough values to unpack (expected 2, got {len(parts)})")
        backend, identity = parts
        if backend == "_":
            backend = "*"
        port_id, _, device_id = identity.replace("+", ":").partition(":")
        if port_id == "_":
            port_id = "*"
        if device_id == "_":
            device_id = "*"
        device_id = device_id.replace("_" * len(UNKNOWN_INTERFACE), UNKNOWN_INTERFACE)
        return cls(backend, port_id, device_id or "*")

    def qarg(self) -> str:
        """The qrexec-argument form, inverse of ``from_qarg``."""
        text = f"{self.backend}+{self.port_id}:{self.device_id}".replace(":", "+")
        text = text.replace(UNKNOWN_INTERFACE, "_" * len(UNKNOWN_INTERFACE))
        return text.replace("*", "_")


def quote(value: str) -> str:
    """Serialize one value: single-quoted, with ``'`` escaped."""
    return "'" + value.replace("'", "\\'") + "'"


def pack(pairs: list[tuple[str, str]]) -> str:
    """Serialize ``(key, value)`` pairs in the given order.

    Raises:
        ProtocolError: A key or value has characters the protocol does not allow.
    """
    out = []
    for key, value in pairs:
        _sanitize(key, KEY_CHARS, "Invalid chars in property name: ")
        quoted = quote(value)
        _sanitize(quoted, VALUE_CHARS, "Invalid chars in property value: ")
        out.append(f"{key}={quoted}")
    return " ".join(out)


def unpack(untrusted_serialization: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """Split a serialization into ``(properties, options)`` exactly as qubesd does.

    The grammar is qubesd's loose one: the text is cut at every ``='``; the value is what
    precedes the last ``' `` before the next cut, the next key what follows it. A repeated
    key keeps its last value. Options are the keys that began with ``_`` (without it).

    Raises:
        UnicodeDecodeError: Not ASCII.
        ProtocolError: A key or value with characters outside ``KEY_CHARS``/``VALUE_CHARS``.
    """
    untrusted_text = untrusted_serialization.decode("ascii", errors="strict").strip()
    properties: dict[str, str] = {}
    options: dict[str, str] = {}
    if not untrusted_text:
        return properties, options
    keys: list[str] = []
    values: list[str] = []
    untrusted_key, _, untrusted_rest = untrusted_text.partition("='")
    keys.append(_sanitize(untrusted_key.strip(), KEY_CHARS, "Invalid chars in property name: "))
    while "='" in untrusted_rest:
        untrusted_value_key, _, untrusted_rest = untrusted_rest.partition("='")
        untrusted_value, _, untrusted_key = untrusted_value_key.rpartition("' ")
        values.append(_sanitize_value(untrusted_value))
        keys.append(_sanitize(untrusted_key.strip(), KEY_CHARS, "Invalid chars in property name: "))
    values.append(_sanitize_value(untrusted_rest[:-1]))  # drop the closing quote
    for key, value in zip(keys, values, strict=True):
        if key.startswith("_"):
            options[key[1:]] = value
        else:
            properties[key] = value
    return properties, options


def _sanitize_value(untrusted_value: str) -> str:
    return _sanitize(
        untrusted_value.replace("\\'", "'"), VALUE_CHARS, "Invalid chars in property value: "
    )


def _sanitize(untrusted_value: str, allowed: frozenset[str], message: str) -> str:
    bad = set(untrusted_value) - allowed
    if bad:
        raise ProtocolError(message + repr(bad))
    return untrusted_value
