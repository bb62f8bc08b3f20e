"""Per-qube firewall rules with the R4.3 grammar of ``admin.vm.firewall.Get`` / ``Set``.

Wiring for the emulated qubesd (helper B), one handler each::

    admin.vm.firewall.Get    -> enforce(not arg); return vm.firewall.api_get(time.time())
    admin.vm.firewall.Set    -> enforce(not arg); vm.firewall.api_set(untrusted_payload)
                                then save state and fire ``firewall-changed`` on the qube
                                (qubesd's ``Firewall.save()`` fires it)
    admin.vm.firewall.Reload -> enforce(not arg); fire ``firewall-changed``

``api_set`` raises ``ValueError`` (``UnicodeDecodeError`` for a non-ASCII payload, which is a
``ValueError`` too) for any bad line and then changes nothing; R4.3 reports neither to the
client (zero-byte reply, see ``sim.exc.is_reported``). A new qube starts from
``Firewall.default()``. Persist with ``to_json`` / ``from_json``.

The grammar, as R4.3 ``qubes/firewall.py`` parses a line (kept faithfully, quirks included):

* Everything after the first ``comment=`` is the comment (spaces allowed); the rest is split on
  single spaces into ``key=value`` options, validated left to right.
* Keys: ``action`` (required), ``proto``, ``dsthost`` / ``dst4`` / ``dst6`` / ``dstname`` (one
  destination; the rendered key follows the value's type, not the key given), ``dstports``
  (only with tcp/udp), ``icmptype`` (only with icmp), ``specialtarget``, ``expire``.
* Rendering order: action, expire, destination, proto, specialtarget, dstports, icmptype,
  comment; ``dstports`` always as ``N-M``; a bare address gets ``/32`` or ``/128``.
"""

from __future__ import annotations

import datetime
import socket
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Longest payload ``api_set`` accepts; qubesd caps the whole request at this size anyway.
MAX_PAYLOAD = 65536

ACTIONS = ("accept", "drop")
PROTOS = ("tcp", "udp", "icmp")
SPECIAL_TARGETS = ("dns",)

_SAFE = frozenset(string.ascii_letters + string.digits + ":;,./-_[]")
_COMMENT_SAFE = _SAFE | {" "}
_HOSTNAME_SAFE = frozenset(string.ascii_lowercase + string.digits + "-._")
_DEST_KEYS = ("dst4", "dst6", "dstname")
_RULE_KEYS = (
    "action",
    "proto",
    "dsthost",
    "dstports",
    "icmptype",
    "specialtarget",
    "expire",
    "comment",
)


@dataclass(frozen=True)
class Rule:
    """One firewall rule, holding the values exactly as qubesd renders them.

    Attributes:
        action: ``accept`` or ``drop``.
        expire: Unix time as the digits that were given (``None``: never expires).
        dst_type: ``dst4``, ``dst6`` or ``dsthost``; ``None`` with ``dst``.
        dst: Destination as rendered (``10.0.0.0/8``, ``::1/128``, ``example.com``).
        proto: ``tcp``, ``udp`` or ``icmp``.
        specialtarget: ``dns``.
        dstports: Inclusive port range.
        icmptype: ICMP type, 0 to 255.
        comment: Free text (letters, digits, ``:;,./-_[]`` and spaces).
    """

    action: str
    expire: str | None = None
    dst_type: str | None = None
    dst: str | None = None
    proto: str | None = None
    specialtarget: str | None = None
    dstports: tuple[int, int] | None = None
    icmptype: int | None = None
    comment: str | None = None

    @classmethod
    def from_api_string(cls, untrusted_line: str) -> Rule:
        """Parse one rule line as ``admin.vm.firewall.Set`` does.

        Raises:
            ValueError: For every line qubesd refuses (the message is qubesd's).
        """
        untrusted_options, _, untrusted_comment = untrusted_line.partition("comment=")
        values: dict[str, object] = {}
        if untrusted_comment:
            values["comment"] = _check_comment(untrusted_comment)
        dst_type: str | None = None
        ports: tuple[int, int] | None = None
        icmptype: int | None = None
        for untrusted_option in untrusted_options.strip().split(" "):
            parts = untrusted_option.split("=", 1)
            if len(parts) != 2:
                # qubesd unpacks the split into two names; this is Python's message.
                raise ValueError(f"not enough values to unpack (expected 2, got {len(parts)})")
            untrusted_key, untrusted_value = parts
            if untrusted_key in values:
                raise ValueError(f"Option '{untrusted_key}' already set")
            if untrusted_key in _DEST_KEYS and "dsthost" in values:
                raise ValueError("Option 'dsthost' already set")
            if untrusted_key in ("dsthost", *_DEST_KEYS):
                dst_type, values["dsthost"] = _parse_dst(untrusted_value)
            elif untrusted_key == "action":
                values["action"] = _parse_choice(untrusted_value, ACTIONS)
            elif untrusted_key == "proto":
                values["proto"] = _parse_choice(untrusted_value, PROTOS)
            elif untrusted_key == "specialtarget":
                values["specialtarget"] = _parse_choice(untrusted_value, SPECIAL_TARGETS)
            elif untrusted_key == "dstports":
                values["dstports"] = ports = _parse_ports(untrusted_value)
            elif untrusted_key == "icmptype":
                values["icmptype"] = icmptype = _parse_icmptype(untrusted_value)
            elif untrusted_key == "expire":
                values["expire"] = _parse_expire(untrusted_value)
            else:
                raise ValueError("Unknown firewall option")
        # --- every value above is validated; dependencies are checked as qubesd orders them.
        proto = values.get("proto")
        if "dstports" in values and proto not in ("tcp", "udp"):
            raise ValueError("dstports valid only for 'tcp' and 'udp' protocols")
        if "icmptype" in values and proto != "icmp":
            raise ValueError("icmptype valid only for 'icmp' protocol")
        if "action" not in values:
            raise ValueError("Required property 'action' not set on <Rule>")
        return cls(
            action=str(values["action"]),
            expire=_opt_str(values.get("expire")),
            dst_type=dst_type,
            dst=_opt_str(values.get("dsthost")),
            proto=_opt_str(proto),
            specialtarget=_opt_str(values.get("specialtarget")),
            dstports=ports,
            icmptype=icmptype,
            comment=_opt_str(values.get("comment")),
        )

    def api_string(self) -> str:
        """The rule as ``admin.vm.firewall.Get`` prints it (without the newline)."""
        parts = [f"action={self.action}"]
        if self.expire is not None:
            parts.append(f"expire={self.expire}")
        if self.dst is not None:
            parts.append(f"{self.dst_type}={self.dst}")
        if self.proto is not None:
            parts.append(f"proto={self.proto}")
        if self.specialtarget is not None:
            parts.append(f"specialtarget={self.specialtarget}")
        if self.dstports is not None:
            parts.append(f"dstports={self.dstports[0]}-{self.dstports[1]}")
        if self.icmptype is not None:
            parts.append(f"icmptype={self.icmptype}")
        if self.comment is not None:
            parts.append(f"comment={self.comment}")
        return " ".join(parts)

    def expired(self, now: float) -> bool:
        """Whether the rule's ``expire`` time is before ``now`` (Unix time)."""
        return self.expire is not None and int(self.expire) < now


class Firewall:
    """The ordered rule list of one qube; the default policy after the list is ``drop``."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: tuple[Rule, ...] = tuple(rules)

    @classmethod
    def default(cls) -> Firewall:
        """A new qube's rules: a single ``action=accept``."""
        return cls([Rule(action="accept")])

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Firewall):
            return self._rules == other._rules
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._rules)

    def __repr__(self) -> str:
        return f"Firewall({list(self._rules)!r})"

    def api_get(self, now: float) -> str:
        """The ``admin.vm.firewall.Get`` reply: one line per unexpired rule, each ending in \\n."""
        return "".join(f"{rule.api_string()}\n" for rule in self._rules if not rule.expired(now))

    def api_set(self, untrusted_payload: bytes) -> None:
        """Replace every rule from an ``admin.vm.firewall.Set`` payload, all or nothing.

        Already-expired rules are accepted, as in qubesd (they are just never shown).

        Raises:
            ValueError: The payload is too long, not ASCII (``UnicodeDecodeError``), or a
                line (an empty one included) is not a valid rule. Nothing changes then.
        """
        if len(untrusted_payload) > MAX_PAYLOAD:
            raise ValueError("payload too long")
        untrusted_text = untrusted_payload.decode("ascii", errors="strict")
        rules = [Rule.from_api_string(line) for line in untrusted_text.splitlines()]
        self._rules = tuple(rules)

    def nearest_expire(self, now: float) -> int | None:
        """The earliest future ``expire`` time, when qubesd would re-save and fire
        ``firewall-changed``; ``None`` if no rule will expire."""
        pending = [
            int(r.expire) for r in self._rules if r.expire is not None and not r.expired(now)
        ]
        return min(pending, default=None)

    def to_json(self) -> list[str]:
        """Rules as their API strings (expired ones included) for the state file."""
        return [rule.api_string() for rule in self._rules]

    @classmethod
    def from_json(cls, data: Sequence[str]) -> Firewall:
        """Inverse of ``to_json``; a corrupt state file raises ``ValueError``."""
        if isinstance(data, str) or not all(isinstance(line, str) for line in data):
            raise ValueError("firewall state must be a list of rule strings")
        return cls(Rule.from_api_string(line) for line in data)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _check_safe(untrusted_value: str) -> str:
    if not all(c in _SAFE for c in untrusted_value):
        raise ValueError("strange characters in rule")
    return untrusted_value


def _check_comment(untrusted_value: str) -> str:
    if not all(c in _COMMENT_SAFE for c in untrusted_value):
        raise ValueError("strange characters comment")
    return untrusted_value


def _parse_choice(untrusted_value: str, allowed: tuple[str, ...]) -> str:
    _check_safe(untrusted_value)
    if untrusted_value not in allowed:
        raise ValueError(untrusted_value)
    return untrusted_value


def _is_address(family: socket.AddressFamily, untrusted_value: str) -> bool:
    """Whether libc's ``inet_pton`` accepts the text (the check qubesd relies on)."""
    try:
        socket.inet_pton(family, untrusted_value)
    except OSError:
        return False
    return True


def _parse_dst(untrusted_value: str) -> tuple[str, str]:
    """Return ``(rendered key, rendered value)`` for a destination option."""
    slashes = untrusted_value.count("/")
    if slashes > 1:
        raise ValueError("Too many /: " + untrusted_value)
    if slashes == 0:
        if _is_address(socket.AF_INET6, untrusted_value):
            return "dst6", _check_safe(untrusted_value + "/128")
        if _is_address(socket.AF_INET, untrusted_value):
            if untrusted_value.count(".") != 3:
                raise ValueError("Invalid number of dots in IPv4 address")
            return "dst4", _check_safe(untrusted_value + "/32")
        if not all(c in _HOSTNAME_SAFE for c in untrusted_value):
            raise ValueError("Invalid hostname")
        return "dsthost", _check_safe(untrusted_value)
    untrusted_host, untrusted_prefixlen = untrusted_value.split("/", 1)
    if not untrusted_prefixlen.isdigit():
        raise ValueError("bad prefix length")
    prefixlen = int(untrusted_prefixlen)
    if _is_address(socket.AF_INET6, untrusted_host):
        if prefixlen > 128:
            raise ValueError("netmask for IPv6 must be <= 128")
        return "dst6", _check_safe(untrusted_value)
    if _is_address(socket.AF_INET, untrusted_host):
        if prefixlen > 32:
            raise ValueError("netmask for IPv4 must be <= 32")
        if untrusted_host.count(".") != 3:
            raise ValueError("Invalid number of dots in IPv4 address")
        return "dst4", _check_safe(untrusted_value)
    raise ValueError("Invalid IP address: " + untrusted_host)


def _parse_ports(untrusted_value: str) -> tuple[int, int]:
    # int() is what qubesd uses, so "+80" and "8_0" are accepted there too.
    dashes = untrusted_value.count("-")
    if dashes == 1:
        low_text, high_text = untrusted_value.split("-", 1)
        low, high = int(low_text), int(high_text)
    elif dashes == 0:
        low = high = int(untrusted_value)
    else:
        raise ValueError(untrusted_value)
    if not (0 <= low < 65536 and 0 <= high < 65536):
        raise ValueError("Ports out of range")
    if low > high:
        raise ValueError("Invalid port range")
    return low, high


def _parse_icmptype(untrusted_value: str) -> int:
    if len(untrusted_value) > 3 or not untrusted_value.isdigit():
        raise ValueError("bad ICMP type")
    value = int(untrusted_value)
    if value > 255:
        raise ValueError("ICMP type out of range")
    return value


def _parse_expire(untrusted_value: str) -> str:
    _check_safe(untrusted_value)
    if not untrusted_value.isdigit():
        raise ValueError("bad expiration time")
    try:
        # qubesd converts it to a datetime at parse time; huge values fail there.
        datetime.datetime.fromtimestamp(int(untrusted_value))
    except (OverflowError, OSError) as exc:
        raise ValueError(str(exc)) from None
    return untrusted_value
