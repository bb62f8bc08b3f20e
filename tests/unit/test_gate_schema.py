"""The one fenced sanitising step: malformed payloads are refused before any lookup."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.dom0.errors import InvalidInputError
from qubes_mcp.dom0.operations import OPERATIONS, OPERATIONS_BY_NAME
from qubes_mcp.dom0.schema import check_payload


def check(op: str, payload: Any) -> dict[str, Any]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return check_payload(OPERATIONS_BY_NAME[op], raw, name_prefix="ai-")


def test_defaults_are_filled_in() -> None:
    assert check("qube.run", {"command": ["id"]}) == {
        "command": ["id"],
        "stdin": "",
        "stdin_base64": "",
        "output": "text",
        "timeout": 60,
    }
    assert check("qube.list", b"") == {}


@pytest.mark.parametrize(
    ("op", "payload", "problem"),
    [
        ("qube.list", b"\xff", "not valid JSON"),
        ("qube.list", b"[]", "must be a JSON object"),
        ("qube.list", b"NaN", "not valid JSON"),
        ("qube.list", {"extra": 1}, "unknown field"),
        ("qube.run", {}, "command is required"),
        ("qube.run", {"command": []}, "non-empty list"),
        ("qube.run", {"command": "rm -rf /"}, "non-empty list"),
        ("qube.run", {"command": ["a\0b"]}, "without NUL"),
        ("qube.run", {"command": ["x"] * 300}, "more than 256"),
        ("qube.run", {"command": ["id"], "timeout": 0}, "between 1 and 3600"),
        ("qube.run", {"command": ["id"], "timeout": True}, "must be an integer"),
        ("qube.run", {"command": ["id"], "timeout": 1.5}, "must be an integer"),
        ("qube.create", {"name": "personal"}, "must start with 'ai-'"),
        ("qube.create", {"name": "ai-"}, "must start with 'ai-'"),
        ("qube.create", {"name": "ai-x\n"}, "must be a qube name"),
        ("qube.create", {"name": "ai-" + "x" * 40}, "must be a qube name"),
        ("qube.create", {"name": "ai-x", "label": "pink"}, "label must be one of"),
        ("qube.create", {"name": "ai-x", "private_size": -1}, "between 1"),
        ("file.copy", {"destination": "@dispvm", "paths": ["/a"]}, "must be a qube name"),
        ("file.copy", {"destination": "dom0\n", "paths": ["/a"]}, "must be a qube name"),
        ("feature.set", {"feature": "a b", "value": "1"}, "not allowed"),
        ("feature.set", {"feature": "service.x", "value": "\x07"}, "not allowed"),
        ("firewall.set", {"rules": [{"action": "allow"}]}, "rules[0]: action must be"),
        ("firewall.set", {"rules": "action=accept"}, "list of rule objects"),
        ("qube.run", {"command": ["id"], "stdin_base64": "a b"}, "must be base64"),
        ("qube.run", {"command": ["id"], "stdin_base64": "YQ"}, "must be base64"),
        ("qube.run", {"command": ["id"], "stdin": "a", "stdin_base64": "YQ=="}, "not both"),
        ("qube.run", {"command": ["id"], "output": "hex"}, "output must be one of"),
        ("file.read", {"path": "relative"}, "path contains characters"),
        ("file.read", {"path": "/a\u0000b"}, "path contains characters"),
        ("file.read", {"path": "/a", "length": 0}, "length must be between"),
        ("file.write", {"path": "/a"}, "data is required"),
        ("file.write", {"path": "/a", "data": "YQ==", "mode": "truncate"}, "mode must be one of"),
    ],
)
def test_malformed_payloads_are_refused_with_a_named_field(
    op: str, payload: Any, problem: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        check(op, payload)
    assert problem in info.value.message


def test_refusals_do_not_echo_the_offending_value() -> None:
    with pytest.raises(InvalidInputError) as info:
        check("file.copy", {"destination": "secret-name-\n", "paths": ["/a"]})
    assert "secret-name" not in info.value.message


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        check("qube.list", b'{"a":' * 5000 + b"1" + b"}" * 5000)


@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_invalid_input(raw: bytes) -> None:
    for op in OPERATIONS:
        with contextlib.suppress(InvalidInputError):
            check_payload(op, raw, name_prefix="ai-")


@given(
    st.dictionaries(
        st.sampled_from(["command", "name", "rules", "seconds", "x"]),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(),
            lambda c: st.lists(c) | st.dictionaries(st.text(), c),
            max_leaves=10,
        ),
    )
)
def test_random_json_never_raises_anything_but_invalid_input(obj: dict[str, Any]) -> None:
    for op in OPERATIONS:
        with contextlib.suppress(InvalidInputError):
            check_payload(op, json.dumps(obj).encode(), name_prefix="ai-")


@pytest.mark.parametrize(
    ("op", "payload", "message"),
    [
        ("qube.run", {"command": ["id"], "comand": 1}, "unknown field 'comand' (expected: "),
        (
            "plan.propose",
            {"steps": [{"op": "qube.run", "target": "ai-x", "args": {}, "argz": {}}]},
            "steps[0]: unknown field 'argz' (expected: args, op, target)",
        ),
    ],
)
def test_an_unknown_field_is_named(op: str, payload: Any, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        check(op, payload)
    assert message in info.value.to_reply()["error"]["message"]


@pytest.mark.parametrize("key", ["a\nb", "\x1b[31m", "X" * 40, "ai-work", "é", ""])
def test_an_unknown_field_that_is_not_a_plain_name_is_described_not_echoed(key: str) -> None:
    for op, payload in (
        ("qube.run", {"command": ["id"], key: 1}),
        ("plan.propose", {"steps": [{"op": "qube.run", "target": "ai-x", "args": {}, key: 1}]}),
    ):
        with pytest.raises(InvalidInputError) as info:
            check(op, payload)
        text = info.value.to_reply()["error"]["message"]
        assert "(not a plain name)" in text and (not key or key not in text)
