"""One qubesd property, and how R4.3 parses a Set payload for it (``property.sanitize``).

Each :class:`PropDef` states what ``qubes/__init__.py`` ``property`` and the VM classes say
about one property: its parse kind (what ``sanitize`` does with the payload), its wire type
(``type=`` in Get), its load stage (GetAll orders by ``(load_stage, order, name)``), whether
it is write-once or stateless (setter ``forbidden``), its default and its setter checks.
Defaults and setters take the holder (a :class:`~.model.Qube` or the app) as ``Any``
because they reach across the model the way the Qubes lambdas do.
"""

from __future__ import annotations

import ipaddress
import string
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import names

Default = Callable[[Any], object]
Setter = Callable[[Any, "PropDef", Any], object]


@dataclass(frozen=True)
class PropDef:
    """One property. ``kind`` is how a payload is parsed; ``vmclass`` limits VM values."""

    name: str
    kind: str = "str"  # str | int | bool | vm | label | uuid | ipv4 | ipv6
    stage: int = 2
    default: Default | None = None
    has_default: bool = True
    setter: Setter | None = None
    write_once: bool = False
    forbidden: bool = False
    vmclass: tuple[str, ...] | None = None
    allow_none: bool = True
    #: ``clone=`` of the R4.3 definition: copied by ``clone_properties`` (a new disposable
    #: from its template); False only for ``name``, ``qid``, ``uuid`` and ``dispid``
    clone: bool = True

    @property
    def wire_type(self) -> str:
        """``type=`` as ``_serialize_property`` computes it."""
        if self.kind == "vm":
            return "vm"
        if self.kind in ("int", "bool"):
            return self.kind
        if self.name == "label":
            return "label"
        return "str"

    def sort_key(self) -> tuple[int, int, str]:
        return (self.stage, 0, self.name)


def const(value: object) -> Default:
    return lambda _holder: value


# --- parsing (``property.sanitize`` / ``VMProperty.sanitize``) -------------------------------

_PARSE_NAMES = {"int": "int", "uuid": "UUID", "ipv4": "IPv4Address", "ipv6": "IPv6Address"}


def parse_bool(value: str) -> bool:
    lc = value.lower()
    if lc in ("0", "no", "false", "off"):
        return False
    if lc in ("1", "yes", "true", "on"):
        return True
    raise exc.QubesValueError(f"Invalid literal for boolean property: {value!r}")


def sanitize(prop: PropDef, untrusted_value: bytes) -> object:
    """Turn a Set payload into a typed value exactly as R4.3 does, before any setter."""
    if prop.kind == "vm":
        try:
            untrusted_name = untrusted_value.decode("ascii")
        except UnicodeDecodeError:
            raise exc.QubesValueError() from None
        if untrusted_name == "":
            return ""
        return names.validate_name(untrusted_name)
    try:
        text = untrusted_value.decode("ascii", errors="strict")
    except UnicodeDecodeError:
        raise exc.QubesValueError("Non-ASCII bytes in property value") from None
    if prop.kind == "bool":
        return parse_bool(text)
    if prop.kind in _PARSE_NAMES:
        try:
            if prop.kind == "int":
                return int(text)
            if prop.kind == "uuid":
                return str(uuidlib.UUID(text))
            if prop.kind == "ipv4":
                return str(ipaddress.IPv4Address(text))
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise exc.QubesValueError(
                f"Failed to parse property value as {_PARSE_NAMES[prop.kind]}"
            ) from None
    if not all(c in string.printable for c in text):
        raise exc.QubesValueError("Invalid characters in property value")
    return text
