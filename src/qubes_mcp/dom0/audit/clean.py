"""Taming values before they reach the audit log: escape, cap, allowlist.

Values handed to the log may have come from a hostile agent (a refused request is logged
with what it asked for), so nothing is stored as given:

- every string is escaped — backslash, and any character that is not printable: controls,
  NUL, newlines, bidi overrides, lone surrogates from non-UTF-8 bytes — and capped at
  :data:`TEXT_CAP` characters with a visible ``…[+N chars]`` marker. The work is O(cap)
  however long the input is, so a 1 MB value costs the same as a short one;
- integers outside ±2**63 and every other type are logged by their escaped ``str()``;
- lists keep :data:`LIST_CAP` items and say how many were left out;
- ``detail`` keeps only keys in :data:`DETAIL_KEYS`. They are structural facts — names,
  counts, sizes, digests, error classes — never property or feature values and never command
  output. The values of any other key are dropped and the key names listed under
  ``dropped_keys``, so a caller's mistake is visible without storing what it tried to log.
- the one exception to the per-string and per-list caps is ``detail["argv"]``, the command
  an agent ran (``[audit] commands = "argv"``): an :class:`Argv` is escaped item by item by
  the same escaping and bounded as a whole by the operator's ``[audit] argv_bytes`` (at most
  :data:`ARGV_CAP_MAX`), so an argument longer than 256 characters or a ninth argument is not
  silently cut below the configured cap. Past the cap the record holds the escaped prefix,
  ``argv_capped: true`` and — from the caller — the SHA-256 of the whole command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

#: per-string cap, in characters after escaping
TEXT_CAP: Final = 256
#: at most this many target names and items per list value
LIST_CAP: Final = 8
_INT_LIMIT: Final = 2**63
#: the largest ``[audit] argv_bytes`` the configuration accepts. An argv costs at most this
#: many bytes in the line plus a short marker, so with everything else a record holds (at
#: most a few KiB) the line stays below MAX_LINE_BYTES and is never replaced by ``overflow``.
ARGV_CAP_MAX: Final = 16384
#: the default ``[audit] argv_bytes``
ARGV_CAP_DEFAULT: Final = 4096
_MAX_SKIPPED: Final = 10_000

#: The only ``detail`` keys whose values are stored; each says *what* was touched or how big,
#: never the content. Extend this set (with a comment) rather than reusing a key for a value.
DETAIL_KEYS: Final = frozenset(
    {
        # qube names and kinds the request named (names, not property values)
        *("source", "dest", "template", "klass", "label"),
        # which property / feature / tag / service / input field was involved: the key only
        *("property", "feature", "tag", "service", "field"),
        # devices and storage
        *("device", "device_class", "volume", "size"),
        # a volume revert: the revision id (a qubesd name, checked against its listing)
        "revision",
        # firewall: how many rules and which action, never the rules
        *("rule_count", "action"),
        # run and copy: digests and byte counts instead of command output; the digest and
        # size of the whole command line and of stdin are always kept
        *("command_sha256", "command_bytes", "stdin_bytes", "stdin_sha256"),
        *("stdout_bytes", "stderr_bytes"),
        # the command line itself ([audit] commands = "argv"): each argument escaped, the
        # whole bounded by [audit] argv_bytes (an Argv, see clean_argv — not TEXT_CAP or
        # LIST_CAP); "argv_capped" is written only by the log, when the argv was cut
        *("argv", "argv_capped"),
        *("exit_code", "files", "bytes", "run_id"),
        # binary file reads and writes: the path (escaped, capped) and the bytes' digest
        *("path", "paths", "data_sha256"),
        # the decision and what followed
        *("tier", "tier_needed", "invariant", "consent", "consent_id", "rolled_back"),
        # a step of an applied plan names its plan and its place in it
        *("plan_id", "step"),
        *("duration_ms", "error_class", "qubesd_error"),
        # written by the log itself (callers may not set the first two)
        *("dropped_keys", "overflow", "torn_bytes", "torn_sha256", "anchor_lag", "reason"),
        # an operator's act (audit/acts.py): the uid that ran it, sudo's SUDO_UID, the
        # act's own arguments, and "dialog" when a consent answer came from the desktop dialog
        *("uid", "sudo_uid", "purge", "scope", "answered_by"),
        # a reload: the SHA-256 of the configuration it put in place (or refused), and
        # "SIGHUP" when it was asked by signal rather than on the operator socket
        *("config_sha256", "signal"),
        # recover after a cut tail: the anchored record that was lost, for the record
        *("lost_seq", "lost_hash"),
        # the operator's export checkpoint, and a refusals-summary line (how many, how long)
        *("exported_seq", "summary", "count", "window_s"),
        # an outcome line written after the gate had to stop for want of it
        "recorded_late",
        # lab links (decision 0018): the link's id and port, and the links a removal closed
        *("link_id", "port", "links_closed"),
    }
)
_RESERVED: Final = frozenset({"dropped_keys", "overflow", "argv_capped"})

Scalar = str | int | bool | None
DetailValue = Scalar | list[str | int]


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a non-UTF-8 byte carried by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _escaped_prefix(
    untrusted_text: str, cap: int, weigh: Callable[[str], int], *, count_bytes: bool
) -> tuple[str, int]:
    """The escaped prefix of ``untrusted_text`` whose pieces weigh at most ``cap`` in all,
    and how much of the input (characters, or UTF-8 bytes with ``count_bytes``) it covers."""
    out: list[str] = []
    used = taken = 0
    for ch in untrusted_text:
        piece = _escape_char(ch)
        weight = weigh(piece)
        if used + weight > cap:
            break
        out.append(piece)
        used += weight
        taken += len(ch.encode("utf-8", "surrogateescape")) if count_bytes else 1
    return "".join(out), taken


def clean_text(untrusted_value: object, cap: int = TEXT_CAP) -> str:
    """Escape and cap one value; the result is printable and at most ``cap`` + marker chars.

    ``bytes`` are decoded as UTF-8 with each invalid byte shown as ``\\xNN``.
    """
    if isinstance(untrusted_value, bytes | bytearray):
        # Decode only a prefix: decoding 1 MB to keep 256 characters would be O(n).
        untrusted_text = bytes(untrusted_value[: cap * 4]).decode("utf-8", "surrogateescape")
        total, unit = len(untrusted_value), "bytes"
    else:
        untrusted_text = (
            untrusted_value if isinstance(untrusted_value, str) else str(untrusted_value)
        )
        total, unit = len(untrusted_text), "chars"
    text, taken = _escaped_prefix(untrusted_text, cap, len, count_bytes=unit == "bytes")
    # ---- fenced: from here the text is printable, backslash-escaped and capped ----
    if taken < total:
        text += f"…[+{total - taken} {unit}]"
    return text


@dataclass(frozen=True)
class Argv:
    """A command line for ``detail["argv"]``, with the operator's bound for it.

    Attributes:
        args: the argv as the agent sent it.
        cap: ``[audit] argv_bytes``: what the escaped argv may take in the line, in bytes of
            its JSON encoding (each argument's text, escaped, plus its quotes and comma).
    """

    args: tuple[object, ...]
    cap: int = ARGV_CAP_DEFAULT


def _json_weight(piece: str) -> int:
    """Bytes an escaped piece takes inside a JSON string (backslash and quote are doubled)."""
    return len(json.dumps(piece, ensure_ascii=False).encode("utf-8")) - 2


def clean_argv(untrusted_argv: Argv) -> tuple[list[str], bool]:
    """The argv escaped argument by argument and bounded as a whole; and whether it was cut.

    Each argument is escaped exactly as :func:`clean_text` escapes (one escaping), so a
    newline or an ANSI sequence in an argument is stored as visible ``\\x0a``/``\\x1b``
    text. The whole costs at most ``cap`` bytes in the line: an argument that does not fit
    is cut with a ``…[+N chars]`` marker, the arguments after it are counted in one
    ``…[+N args]`` item, and the result says it was cut. The work is O(cap).
    """
    cap = max(0, min(untrusted_argv.cap, ARGV_CAP_MAX))
    items = untrusted_argv.args
    out: list[str] = []
    used = 0
    for index, item in enumerate(items):
        text = item if isinstance(item, str) else str(item)
        room = cap - used - 3  # its quotes and the comma before the next one
        if room < 0:
            out.append(f"…[+{len(items) - index} args]")
            return out, True
        piece, taken = _escaped_prefix(text, room, _json_weight, count_bytes=False)
        used += _json_weight(piece) + 3
        if taken < len(text):
            out.append(f"{piece}…[+{len(text) - taken} chars]")
            if index + 1 < len(items):
                out.append(f"…[+{len(items) - index - 1} args]")
            return out, True
        out.append(piece)
    return out, False


def clean_scalar(value: object) -> Scalar:
    """``None``, a bool, a 64-bit int, or else escaped capped text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and -_INT_LIMIT < value < _INT_LIMIT:
        return value
    return clean_text(value)


def clean_list(values: Iterable[object]) -> list[str | int]:
    """At most :data:`LIST_CAP` tamed items, then a marker counting the rest."""
    out: list[str | int] = []
    skipped = 0
    for item in values:
        if len(out) >= LIST_CAP:
            skipped += 1
            if skipped >= _MAX_SKIPPED:  # an endless iterable must not hold the log
                break
            continue
        cleaned = clean_scalar(item)
        out.append(cleaned if isinstance(cleaned, str | int) else clean_text(cleaned))
    if skipped:
        more = "+" if skipped >= _MAX_SKIPPED else ""
        out.append(f"…[+{skipped}{more} items]")
    return out


def clean_detail(untrusted_detail: Mapping[str, object] | None) -> dict[str, DetailValue]:
    """Keep allowlisted keys with tamed values; name (never store) the others."""
    out: dict[str, DetailValue] = {}
    dropped: list[object] = []
    for key, value in (untrusted_detail or {}).items():
        if key not in DETAIL_KEYS or key in _RESERVED:
            dropped.append(key)
        elif key == "argv":
            argv = (
                value
                if isinstance(value, Argv)
                else Argv(  # a plain list: default bound
                    tuple(value) if isinstance(value, list | tuple) else (value,)
                )
            )
            kept, capped = clean_argv(argv)
            out[key] = list[str | int](kept)
            if capped:
                out["argv_capped"] = True
        elif isinstance(value, set | frozenset):
            out[key] = clean_list(sorted(value, key=str))
        elif isinstance(value, list | tuple):
            out[key] = clean_list(value)
        else:
            out[key] = clean_scalar(value)
    if dropped:
        out["dropped_keys"] = clean_list(sorted(dropped, key=str))
    return out


def clean_targets(untrusted_targets: Iterable[object] | str | bytes) -> list[str]:
    """Target qube names, tamed (a lone string is one target)."""
    if isinstance(untrusted_targets, str | bytes):
        untrusted_targets = [untrusted_targets]
    return [str(t) for t in clean_list(untrusted_targets)]
