"""A qube's rule list: Get/Set replies, all-or-nothing replacement, expiry, persistence."""

from __future__ import annotations

import json

import pytest

from qubes_mcp.sim.firewall import MAX_PAYLOAD, Firewall, Rule

NOW = 1_700_000_000.0

# qubesd test_571: the expired rule is left out, the rest in order, each line \n-terminated.
RULES_571 = (
    b"action=accept proto=tcp dstports=1-1024\n"
    b"action=drop proto=icmp comment=No ICMP\n"
    b"action=drop expire=1499450306 proto=udp\n"
    b"action=drop expire=2099450306 proto=udp\n"
    b"action=accept\n"
)
GET_571 = (
    "action=accept proto=tcp dstports=1-1024\n"
    "action=drop proto=icmp comment=No ICMP\n"
    "action=drop expire=2099450306 proto=udp\n"
    "action=accept\n"
)


def test_new_qube_accepts_everything() -> None:
    assert Firewall.default().api_get(NOW) == "action=accept\n"


def test_get_omits_expired_rules_in_order() -> None:
    fw = Firewall.default()
    fw.api_set(RULES_571)
    assert fw.api_get(NOW) == GET_571
    # The expired rule is kept (qubesd keeps it in memory) and reappears for an older clock.
    assert "expire=1499450306" in fw.api_get(1_400_000_000.0)


def test_set_of_empty_payload_leaves_no_rules() -> None:
    fw = Firewall.default()
    fw.api_set(b"")
    assert fw.api_get(NOW) == ""
    assert fw.rules == ()


def test_set_accepts_crlf_and_missing_final_newline() -> None:
    fw = Firewall.default()
    fw.api_set(b"action=drop proto=udp\r\naction=accept")
    assert fw.api_get(NOW) == "action=drop proto=udp\naction=accept\n"


HOSTILE_PAYLOADS = {
    # qubesd test_582..585
    "unknown-option-then-valid": b"action=accept protoxyz=tcp dst4=127.0.0.1\naction=drop\n",
    "missing-action-first-line": b"proto=tcp dstports=1-1024\naction=drop\n",
    "two-rules-one-line": b"action=accept proto=tcp dstports=1-1024 action=drop\n",
    "non-ascii-comment": "action=accept dstports=1-1024 comment=ążźł\naction=drop\n".encode(),
    # ours
    "empty-line-between-rules": b"action=drop\n\naction=accept\n",
    "bad-last-line": b"action=drop\naction=accept\nrm -rf /\n",
    "nul-byte": b"action=drop\x00\n",
    "latin1-byte": b"action=drop comment=caf\xe9\n",
    "unicode-digit-port-non-ascii": "action=accept proto=tcp dstports=٣\n".encode(),
    "oversized": b"action=drop\n" * (MAX_PAYLOAD // 12 + 1),
}


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS.values(), ids=HOSTILE_PAYLOADS.keys())
def test_bad_payload_changes_nothing(payload: bytes) -> None:
    fw = Firewall.default()
    fw.api_set(b"action=drop proto=icmp\naction=accept\n")
    before = fw.api_get(NOW)
    with pytest.raises(ValueError):  # R4.3: zero-byte reply, rules untouched
        fw.api_set(payload)
    assert fw.api_get(NOW) == before


def test_non_ascii_is_a_unicode_decode_error() -> None:
    with pytest.raises(UnicodeDecodeError):
        Firewall.default().api_set("action=accept comment=ąż\n".encode())


def test_json_round_trip_keeps_expired_rules() -> None:
    fw = Firewall.default()
    fw.api_set(RULES_571)
    data = json.loads(json.dumps(fw.to_json()))
    restored = Firewall.from_json(data)
    assert restored == fw
    assert restored.api_get(NOW) == GET_571


@pytest.mark.parametrize(
    "data",
    [["action=accept", "bogus"], "action=accept", [1]],
    ids=["corrupt-rule", "string-not-list", "non-string-item"],
)
def test_corrupt_state_is_rejected(data: object) -> None:
    with pytest.raises(ValueError):  # a corrupt state file must not load silently
        Firewall.from_json(data)  # type: ignore[arg-type]


def test_nearest_expire_ignores_past_and_permanent_rules() -> None:
    fw = Firewall(
        [
            Rule.from_api_string("action=drop expire=1000"),
            Rule.from_api_string("action=drop expire=2099450306"),
            Rule.from_api_string("action=drop expire=2000000000"),
            Rule.from_api_string("action=accept"),
        ]
    )
    assert fw.nearest_expire(NOW) == 2000000000
    assert Firewall.default().nearest_expire(NOW) is None
