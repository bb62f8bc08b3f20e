"""One audit record: its fields, its exact line bytes, its hash, and the anchor format.

A record is one line of canonical JSON (sorted keys, no spaces, UTF-8, ``\\n``-terminated).
``hash`` is SHA-256 over a domain tag and the canonical JSON of every other field, and
``prev`` is the ``hash`` of the record before it, so the file is a hash chain.

Callers' values are tamed by :mod:`qubes_mcp.dom0.audit.clean` (escaped, capped,
allowlisted). The finished line is at most :data:`MAX_LINE_BYTES`: if ``detail`` would push it
over, ``detail`` becomes ``{"overflow": <bytes>}``, so the request is still recorded.

Reading goes the other way through :func:`parse_line`, which treats the file as untrusted:
a line is accepted only if it is byte-for-byte the canonical encoding of a well-typed record
whose hash matches, so an edit of any byte is caught even where JSON would not care.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, NotRequired, TypedDict

from qubes_mcp.dom0.audit.clean import (
    DETAIL_KEYS,
    DetailValue,
    clean_detail,
    clean_targets,
    clean_text,
)

VERSION: Final = 1
GENESIS: Final = "0" * 64
MAX_LINE_BYTES: Final = 32 * 1024
_HASH_TAG: Final = b"qubes-mcp-audit-v1\0"

DECISIONS: Final = frozenset({"allowed", "refused"})
OUTCOMES: Final = frozenset({"ok", "failed", "rolled-back", "pending", "not-run", "interrupted"})

_FIELDS: Final = frozenset(
    [
        "v",
        "seq",
        "ts",
        "prev",
        "hash",
        "principal",
        "op",
        "targets",
        "decision",
        "code",
        "outcome",
        "request_id",
        "detail",
    ]
)
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A line or value read back from disk is not a valid record (never raised on append)."""


@dataclass(frozen=True)
class AuditRecord:
    """One audit line, as written and as read back.

    Attributes:
        seq: position in the chain, 1 for the first record ever, continuing across rotation.
        ts: UTC time from the log's clock, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.
        prev: ``hash`` of the previous record (:data:`GENESIS` for seq 1).
        hash: SHA-256 hex over every other field.
        principal: the agent principal (or ``dom0`` for operator actions).
        op: the operation, e.g. ``qmcp.Start``.
        targets: qube names the request named (escaped and capped).
        decision: ``allowed`` or ``refused``.
        code: the stable error code of a refusal or failure, else ``""``.
        outcome: ``ok``, ``failed``, ``rolled-back``, ``pending``, ``not-run`` or
            ``interrupted`` (written by start-up recovery for a request the gate never finished).
        request_id: the gate's id for the request (ties a ``pending`` line to its outcome).
        detail: allowlisted structural facts (see :data:`DETAIL_KEYS`).
        v: record format version.
    """

    seq: int
    ts: str
    prev: str
    hash: str
    principal: str
    op: str
    targets: tuple[str, ...]
    decision: str
    code: str
    outcome: str
    request_id: str
    detail: Mapping[str, DetailValue]
    v: int = VERSION

    def body(self) -> dict[str, object]:
        """Every field except ``hash``: what the hash covers."""
        return {
            "v": self.v,
            "seq": self.seq,
            "ts": self.ts,
            "prev": self.prev,
            "principal": self.principal,
            "op": self.op,
            "targets": list(self.targets),
            "decision": self.decision,
            "code": self.code,
            "outcome": self.outcome,
            "request_id": self.request_id,
            "detail": dict(self.detail),
        }

    def line(self) -> bytes:
        """The exact bytes written to the log, newline included."""
        return canonical({**self.body(), "hash": self.hash}) + b"\n"


def canonical(obj: object) -> bytes:
    """The one JSON encoding used for hashing and writing (sorted, compact, UTF-8).

    ``ensure_ascii=False`` keeps names readable; it is safe because tamed strings hold no
    control characters and JSON escapes quotes and backslashes.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def chain_hash(body: Mapping[str, object]) -> str:
    """SHA-256 hex of a record body (all fields but ``hash``)."""
    return hashlib.sha256(_HASH_TAG + canonical(body)).hexdigest()


class RecordFields(TypedDict):
    """What a caller supplies for one record (the log adds seq, prev, ts and hash)."""

    principal: object
    op: object
    decision: str
    outcome: str
    targets: NotRequired[Iterable[object] | str | bytes]
    code: NotRequired[object]
    request_id: NotRequired[object]
    detail: NotRequired[Mapping[str, object] | None]


def utc_stamp(epoch: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` for a POSIX time (the clock is injected by the log)."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_record(
    *,
    seq: int,
    prev: str,
    ts: str,
    principal: object,
    op: object,
    decision: str,
    outcome: str,
    targets: Iterable[object] | str | bytes = (),
    code: object = "",
    request_id: object = "",
    detail: Mapping[str, object] | None = None,
) -> AuditRecord:
    """Tame every caller value, enforce the line cap and seal the record with its hash.

    Raises:
        ValueError: ``decision`` or ``outcome`` is not one of the fixed words (a bug in the
            caller, not hostile input: those words are chosen by the gate).
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {sorted(DECISIONS)}, not {decision!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
    fields: dict[str, object] = {
        "v": VERSION,
        "seq": seq,
        "ts": ts,
        "prev": prev,
        "principal": clean_text(principal, 64),
        "op": clean_text(op, 64),
        "targets": clean_targets(targets),
        "decision": decision,
        "code": clean_text(code, 32),
        "outcome": outcome,
        "request_id": clean_text(request_id, 64),
        "detail": clean_detail(detail),
    }
    # 64 hex + the key is what "hash" adds to the line.
    size = len(canonical(fields)) + len(',"hash":""') + 64 + 1
    if size > MAX_LINE_BYTES:
        # Everything but detail is capped far below the limit, so this always fits.
        fields["detail"] = {"overflow": size}
    return _sealed(fields)


def _sealed(fields: dict[str, object]) -> AuditRecord:
    targets = fields["targets"]
    detail = fields["detail"]
    if not isinstance(targets, list) or not isinstance(detail, dict):
        raise RecordError("targets or detail has the wrong type")
    return AuditRecord(
        v=_int(fields["v"]),
        seq=_int(fields["seq"]),
        ts=_str(fields["ts"]),
        prev=_str(fields["prev"]),
        hash=chain_hash(fields),
        principal=_str(fields["principal"]),
        op=_str(fields["op"]),
        targets=tuple(_str(t) for t in targets),
        decision=_str(fields["decision"]),
        code=_str(fields["code"]),
        outcome=_str(fields["outcome"]),
        request_id=_str(fields["request_id"]),
        detail=detail,
    )


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(f"expected an integer, got {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {type(value).__name__}")
    return value


# --- reading lines back (the file is untrusted: anyone with dom0 root could have edited it) --


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise RecordError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise RecordError(f"non-JSON constant {name}")


def _reject_float(text: str) -> object:
    raise RecordError(f"unexpected number {text}")


def load_json(untrusted_data: bytes, cap: int) -> dict[str, object]:
    """Strict JSON object from untrusted bytes: capped, UTF-8, no duplicates, no floats."""
    if len(untrusted_data) > cap:
        raise RecordError(f"longer than {cap} bytes")
    try:
        untrusted_text = untrusted_data.decode("utf-8")
        untrusted_obj = json.loads(
            untrusted_text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=_reject_float,
        )
    except UnicodeDecodeError as err:
        raise RecordError("not UTF-8") from err
    except json.JSONDecodeError as err:
        raise RecordError(f"not JSON ({err.msg} at column {err.colno})") from err
    except RecursionError as err:
        raise RecordError("nested too deeply") from err
    if not isinstance(untrusted_obj, dict):
        raise RecordError("not a JSON object")
    return untrusted_obj


def _check_detail(untrusted_detail: object) -> dict[str, DetailValue]:
    if not isinstance(untrusted_detail, dict):
        raise RecordError("detail is not an object")
    for key, value in untrusted_detail.items():
        if key not in DETAIL_KEYS:
            raise RecordError(f"detail key {key!r} is not allowlisted")
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, list | dict) or (isinstance(value, list) and item is None):
                raise RecordError(f"detail {key!r} has a value of the wrong shape")
    return untrusted_detail


def parse_line(untrusted_line: bytes) -> AuditRecord:
    """Parse one line (without its newline) and prove it is an untouched record.

    Raises:
        RecordError: the line is not exactly the canonical encoding of a well-formed record
            whose ``hash`` matches its content. Chain position (``seq``/``prev``) is the
            caller's to check.
    """
    untrusted = load_json(untrusted_line, MAX_LINE_BYTES)
    if set(untrusted) != _FIELDS:
        missing = sorted(_FIELDS - set(untrusted))
        extra = sorted(set(untrusted) - _FIELDS)
        raise RecordError(f"wrong fields (missing {missing}, unexpected {extra})")
    if untrusted["v"] != VERSION:
        raise RecordError(f"unknown record version {untrusted['v']!r}")
    for name in ("prev", "hash"):
        value = untrusted[name]
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise RecordError(f"{name} is not 64 lowercase hex digits")
    seq = _int(untrusted["seq"])
    if seq < 1:
        raise RecordError("seq is not positive")
    if untrusted["decision"] not in DECISIONS or untrusted["outcome"] not in OUTCOMES:
        raise RecordError("decision or outcome is not a known word")
    targets = untrusted["targets"]
    if not isinstance(targets, list):
        raise RecordError("targets is not a list")
    body = {k: v for k, v in untrusted.items() if k != "hash"}
    body["detail"] = _check_detail(untrusted["detail"])
    record = _sealed(body)
    # ---- fenced: a well-typed record; now prove these are the bytes we would have written ----
    if record.hash != untrusted["hash"]:
        raise RecordError("hash does not match the content (edited)")
    if record.line()[:-1] != untrusted_line:
        raise RecordError("not in canonical form (edited)")
    return record


# --- the anchor ("head") file: the last seq and hash, and where the retained chain begins ---


@dataclass(frozen=True)
class Anchor:
    """Contents of the head file, rewritten atomically after every append.

    Attributes:
        seq: seq of the last record written (0 before the first).
        hash: its hash (:data:`GENESIS` before the first).
        base_seq: seq of the first record the retained files must still hold.
        base_prev: that record's ``prev``; deleting retained files moves the first record
            found past ``base_seq``, which verify reports.
    """

    seq: int
    hash: str
    base_seq: int = 1
    base_prev: str = GENESIS

    def encode(self) -> bytes:
        return (
            canonical(
                {
                    "v": VERSION,
                    "seq": self.seq,
                    "hash": self.hash,
                    "base_seq": self.base_seq,
                    "base_prev": self.base_prev,
                }
            )
            + b"\n"
        )


ANCHOR_CAP: Final = 1024


def parse_anchor(untrusted_data: bytes) -> Anchor:
    """Parse a head file strictly (same rules as a record line).

    Raises:
        RecordError: it is not exactly what :meth:`Anchor.encode` writes.
    """
    if not untrusted_data.endswith(b"\n"):
        raise RecordError("anchor file is incomplete (no final newline)")
    untrusted = load_json(untrusted_data[:-1], ANCHOR_CAP)
    if set(untrusted) != {"v", "seq", "hash", "base_seq", "base_prev"}:
        raise RecordError("anchor file has the wrong fields")
    if untrusted["v"] != VERSION:
        raise RecordError("anchor file has an unknown version")
    anchor = Anchor(
        seq=_int(untrusted["seq"]),
        hash=_str(untrusted["hash"]),
        base_seq=_int(untrusted["base_seq"]),
        base_prev=_str(untrusted["base_prev"]),
    )
    if anchor.seq < 0 or anchor.base_seq < 1:
        raise RecordError("anchor file has an impossible seq")
    if not (_HEX64.fullmatch(anchor.hash) and _HEX64.fullmatch(anchor.base_prev)):
        raise RecordError("anchor file hash is not 64 lowercase hex digits")
    if anchor.encode() != untrusted_data:
        raise RecordError("anchor file is not in canonical form (edited)")
    return anchor
