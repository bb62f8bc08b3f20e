"""Checking an agent's JSON payload against an operation's fields, before anything else.

This is the one fenced sanitising step: bytes from the control qube come in as
``untrusted_payload`` and leave as a dict of values whose type, length, charset and range are
known. Qube names are checked on *shape* only here (existence and scope are the decision's
job), and a ``new_name`` must already sit inside the principal's prefix, so a name outside the
agent's namespace is refused before any lookup could tell whether it exists.
Messages name the field, never echo the value.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from qubes_mcp.dom0.errors import InvalidInputError
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.operations import Field, Operation

#: total bytes of a command line or path list (see _check_argv)
ARGV_TOTAL_MAX = 16384
#: JSON nesting and size are bounded by the byte cap; this bounds the parse itself
_MAX_DEPTH = 8


def _depth(value: object, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _reject_constant(name: str) -> None:
    raise InvalidInputError("payload is not valid JSON")


def parse_payload(untrusted_payload: bytes) -> dict[str, Any]:
    """Decode the payload: empty means ``{}``; anything but a JSON object is refused."""
    if not untrusted_payload.strip():
        return {}
    try:
        untrusted_text = untrusted_payload.decode("utf-8")
        untrusted_obj = json.loads(untrusted_text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidInputError("payload is not valid JSON") from None
    if not isinstance(untrusted_obj, dict):
        raise InvalidInputError("payload must be a JSON object")
    if _depth(untrusted_obj) > _MAX_DEPTH:
        raise InvalidInputError("payload is nested too deeply")
    return untrusted_obj


def _check_str(f: Field, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{f.name} must be a string")
    if len(value) > f.max_len:
        raise InvalidInputError(f"{f.name} is longer than {f.max_len} characters")
    if f.pattern and not re.match(f.pattern, value):
        raise InvalidInputError(f"{f.name} contains characters that are not allowed")
    return value


def _check_base64(f: Field, value: object) -> str:
    """Strict base64 (no whitespace, correct padding); the trusted value stays text."""
    text = _check_str(f, value)
    try:
        base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InvalidInputError(f"{f.name} must be base64 (RFC 4648, no line breaks)") from None
    return text


def _check_int(f: Field, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{f.name} must be an integer")
    if not f.minimum <= value <= f.maximum:
        raise InvalidInputError(f"{f.name} must be between {f.minimum} and {f.maximum}")
    return value


def _check_argv(f: Field, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidInputError(f"{f.name} must be a non-empty list of strings")
    if len(value) > f.maximum:
        raise InvalidInputError(f"{f.name} has more than {f.maximum} items")
    for item in value:
        if not isinstance(item, str) or "\0" in item:
            raise InvalidInputError(f"{f.name} items must be strings without NUL")
        if len(item) > f.max_len:
            raise InvalidInputError(f"{f.name} items must be at most {f.max_len} characters")
    # qrexec carries the whole argv in the service argument (at most 65000 bytes, with every
    # unusual byte written as three): keep the total well inside that
    if sum(len(item.encode()) + 1 for item in value) > ARGV_TOTAL_MAX:
        raise InvalidInputError(f"{f.name} is longer than {ARGV_TOTAL_MAX} bytes in total")
    return list(value)


def _check_rules(f: Field, value: object) -> list[dict[str, object]]:
    from qubes_mcp.dom0.firewall import FirewallRuleError, parse_rule_object

    if not isinstance(value, list):
        raise InvalidInputError(f"{f.name} must be a list of rule objects")
    if len(value) > f.maximum:
        raise InvalidInputError(f"{f.name} has more than {f.maximum} rules")
    rules = []
    for index, item in enumerate(value):
        try:
            rules.append(parse_rule_object(item))
        except FirewallRuleError as exc:
            raise InvalidInputError(f"{f.name}[{index}]: {exc}") from None
    return rules


def _check_steps(f: Field, value: object) -> list[dict[str, Any]]:
    """Shape only: each step is {op, target, args}; the step's own payload is checked against
    its operation when the plan is proposed (plans.py), like any other request."""
    from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME, Target

    if not isinstance(value, list) or not value:
        raise InvalidInputError(f"{f.name} must be a non-empty list of steps")
    if len(value) > f.maximum:
        raise InvalidInputError(f"{f.name} has more than {f.maximum} steps")
    steps = []
    for index, step in enumerate(value):
        where = f"{f.name}[{index}]"
        if not isinstance(step, dict):
            raise InvalidInputError(f"{where} must be an object with op, target, args")
        for untrusted_key in step:
            if untrusted_key not in ("op", "target", "args"):
                raise InvalidInputError(
                    f"{where}: unknown field {_shown(untrusted_key)} (expected: args, op, target)"
                )
        op = OPERATIONS_BY_NAME.get(step.get("op"))  # type: ignore[arg-type]
        if op is None or op.read_only or op.name.startswith("plan."):
            raise InvalidInputError(f"{where}.op must be a state-changing operation")
        target = step.get("target")
        if op.target is Target.GLOBAL:
            if target is not None:
                raise InvalidInputError(f"{where}.target must be null for {op.name}")
        elif not is_valid_qube_name(target) or target == "dom0":
            raise InvalidInputError(f"{where}.target must be a qube name")
        args = step.get("args", {})
        if not isinstance(args, dict):
            raise InvalidInputError(f"{where}.args must be an object")
        steps.append({"op": op.name, "target": target, "args": args})
    return steps


def check_field(f: Field, value: object, *, name_prefix: str) -> object:
    """Check one present, non-null value of field ``f``; return the trusted value."""
    kind = f.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInputError(f"{f.name} must be true or false")
        return value
    if kind == "int":
        return _check_int(f, value)
    if kind in ("str", "text"):
        return _check_str(f, value)
    if kind == "base64":
        return _check_base64(f, value)
    if kind == "choice":
        if value not in f.choices:
            raise InvalidInputError(f"{f.name} must be one of: {', '.join(f.choices)}")
        return value
    if kind == "qube":
        if not is_valid_qube_name(value):
            raise InvalidInputError(f"{f.name} must be a qube name")
        return value
    if kind == "new_name":
        if not is_valid_qube_name(value):
            raise InvalidInputError(f"{f.name} must be a qube name")
        assert isinstance(value, str)
        if not value.startswith(name_prefix) or len(value) == len(name_prefix):
            raise InvalidInputError(f"{f.name} must start with {name_prefix!r} (your namespace)")
        return value
    if kind == "argv":
        return _check_argv(f, value)
    if kind == "rules":
        return _check_rules(f, value)
    if kind == "steps":
        return _check_steps(f, value)
    raise AssertionError(f"unknown field kind {kind}")  # programming error, caught as failed


_PLAIN_KEY = re.compile(r"\A[a-z][a-z0-9_]{0,31}\Z")


def _shown(untrusted_key: str) -> str:
    """An unknown key, named in the error when it is a plain identifier (nothing in it can
    mislead or carry data); anything else is described, not echoed."""
    return repr(untrusted_key) if _PLAIN_KEY.match(untrusted_key) else "(not a plain name)"


def check_payload(op: Operation, untrusted_payload: bytes, *, name_prefix: str) -> dict[str, Any]:
    """The fenced step: untrusted bytes in, trusted arguments out (defaults filled in)."""
    untrusted_obj = parse_payload(untrusted_payload)
    known = {f.name for f in op.fields}
    for untrusted_key in untrusted_obj:
        if untrusted_key not in known:
            raise InvalidInputError(
                f"unknown field {_shown(untrusted_key)} "
                f"(expected: {', '.join(sorted(known)) or 'none'})"
            )
    args: dict[str, Any] = {}
    for f in op.fields:
        if f.name not in untrusted_obj or untrusted_obj[f.name] is None:
            if f.name in untrusted_obj and f.nullable:
                args[f.name] = None
                continue
            if f.required:
                raise InvalidInputError(f"{f.name} is required")
            args[f.name] = f.default
            continue
        args[f.name] = check_field(f, untrusted_obj[f.name], name_prefix=name_prefix)
    for f in op.fields:
        if f.excludes and args.get(f.name) and args.get(f.excludes):
            raise InvalidInputError(f"give {f.name} or {f.excludes}, not both")
    return args
