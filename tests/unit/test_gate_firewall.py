"""Agent-written firewall rules: validated like qubesd, rendered in qubesd's canonical order."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.dom0.firewall import (
    FirewallRuleError,
    parse_rule_line,
    parse_rule_object,
    render_rule,
    render_rules,
)


@pytest.mark.parametrize(
    ("rule", "line"),
    [
        ({"action": "accept"}, "action=accept"),
        (
            {"action": "accept", "proto": "tcp", "dstports": "1-1024"},
            "action=accept proto=tcp dstports=1-1024",
        ),
        (
            {"action": "drop", "proto": "icmp", "comment": "No ICMP"},
            "action=drop proto=icmp comment=No ICMP",
        ),
        (
            {"action": "accept", "dst4": "10.0.0.1", "proto": "tcp", "dstports": 443},
            "action=accept dst4=10.0.0.1/32 proto=tcp dstports=443-443",
        ),
        ({"action": "accept", "dst6": "2001:db8::/32"}, "action=accept dst6=2001:db8::/32"),
        (
            {"action": "accept", "dsthost": "example.com", "proto": "udp", "dstports": "53"},
            "action=accept dsthost=example.com proto=udp dstports=53-53",
        ),
        ({"action": "accept", "specialtarget": "dns"}, "action=accept specialtarget=dns"),
        ({"action": "drop", "proto": "icmp", "icmptype": 8}, "action=drop proto=icmp icmptype=8"),
    ],
)
def test_rules_render_like_qubesd(rule: dict[str, Any], line: str) -> None:
    assert render_rule(parse_rule_object(rule)) == line


@pytest.mark.parametrize(
    "rule",
    [
        {"proto": "tcp"},
        {"action": "reject"},
        {"action": "accept", "dstports": "80"},
        {"action": "accept", "proto": "udp", "icmptype": 1},
        {"action": "accept", "proto": "icmp", "icmptype": 256},
        {"action": "accept", "dst4": "10.0.0"},
        {"action": "accept", "dst4": "10.0.0.1/33"},
        {"action": "accept", "dst4": "10.0.0.1/8"},
        {"action": "accept", "dst4": "::1"},
        {"action": "accept", "dsthost": "Example.com"},
        {"action": "accept", "dsthost": "a b"},
        {"action": "accept", "dst4": "1.2.3.4", "dsthost": "x"},
        {"action": "accept", "proto": "tcp", "dstports": "90-80"},
        {"action": "accept", "proto": "tcp", "dstports": "70000"},
        {"action": "accept", "comment": "a\nb"},
        {"action": "accept", "comment": "x=y"},
        {"action": "accept", "expire": 1},
        {"action": "accept", "specialtarget": "ntp"},
        "action=accept",
    ],
)
def test_bad_rules_are_refused(rule: Any) -> None:
    with pytest.raises(FirewallRuleError):
        parse_rule_object(rule)


def test_payload_is_newline_terminated_ascii() -> None:
    rules = [
        parse_rule_object({"action": "accept", "specialtarget": "dns"}),
        parse_rule_object({"action": "drop"}),
    ]
    assert render_rules(rules) == b"action=accept specialtarget=dns\naction=drop\n"


def test_lines_read_back_as_objects() -> None:
    assert parse_rule_line("action=drop proto=icmp comment=No ICMP here") == {
        "action": "drop",
        "proto": "icmp",
        "comment": "No ICMP here",
    }


@given(
    st.dictionaries(
        st.sampled_from(
            ["action", "proto", "dst4", "dsthost", "dstports", "icmptype", "comment", "zzz"]
        ),
        st.one_of(st.text(max_size=20), st.integers(), st.none()),
    )
)
def test_random_rules_only_raise_rule_errors_and_render_parseably(rule: dict[str, Any]) -> None:
    try:
        normal = parse_rule_object(rule)
    except FirewallRuleError:
        return
    line = render_rule(normal)
    assert "\n" not in line
    assert (
        parse_rule_object(
            parse_rule_line(line)
            | ({"icmptype": normal["icmptype"]} if "icmptype" in normal else {})
        )
        == normal
    )
