"""Firewall rule grammar: the R4.3 ``admin.vm.firewall.*`` line format, valid and hostile."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.sim.firewall import Rule

# Lines and renderings taken from qubesd's own tests (qubes/tests/firewall.py,
# qubes/tests/api_admin.py test_571/581), as data.
ROUND_TRIP = [
    "action=drop proto=tcp dstports=80-80",
    "action=accept expire=2063292452 proto=tcp comment=Some comment, with spaces",
    "action=accept proto=tcp dstports=1-1024",
    "action=drop proto=icmp comment=No ICMP",
    "action=drop expire=1499450306 proto=udp",
    "action=accept",
    "action=accept dst4=127.0.0.0/8",
    "action=accept dst6=2001:abcd:efab::/64",
    "action=accept dsthost=qubes-os.org",
    "action=accept proto=icmp icmptype=8",
    "action=accept specialtarget=dns",
]


@pytest.mark.parametrize("line", ROUND_TRIP)
def test_qubesd_lines_render_back_identically(line: str) -> None:
    assert Rule.from_api_string(line).api_string() == line


NORMALISED = {
    "bare-ipv4-gets-/32": ("action=accept dst4=127.0.0.1", "action=accept dst4=127.0.0.1/32"),
    "bare-ipv6-gets-/128": (
        "action=accept dst6=2001:abcd:efab::3",
        "action=accept dst6=2001:abcd:efab::3/128",
    ),
    "single-port-as-range": (
        "action=accept proto=udp dstports=53",
        "action=accept proto=udp dstports=53-53",
    ),
    "key-order-from-qubesd": (
        "dstports=443 proto=tcp dsthost=example.com action=drop expire=2099450306 comment=hi",
        "action=drop expire=2099450306 dsthost=example.com proto=tcp dstports=443-443 comment=hi",
    ),
    "dstname-ip-becomes-dst4": ("action=accept dstname=10.1.2.3", "action=accept dst4=10.1.2.3/32"),
    "dst4-given-ipv6-becomes-dst6": ("action=accept dst4=::1", "action=accept dst6=::1/128"),
    "dst6-given-hostname-becomes-dsthost": ("action=accept dst6=a.b", "action=accept dsthost=a.b"),
    "icmptype-leading-zeros-dropped": (
        "action=accept proto=icmp icmptype=008",
        "action=accept proto=icmp icmptype=8",
    ),
    "expire-digits-kept-verbatim": ("action=accept expire=0099", "action=accept expire=0099"),
    "prefix-digits-kept-verbatim": (
        "action=accept dst4=10.0.0.0/08",
        "action=accept dst4=10.0.0.0/08",
    ),
    "comment-glued-to-option": ("action=acceptcomment=x", "action=accept comment=x"),
    "python-int-port-spelling": (
        "action=accept proto=tcp dstports=+8_0",
        "action=accept proto=tcp dstports=80-80",
    ),
    "surrounding-whitespace-stripped": (" action=drop ", "action=drop"),
    "empty-comment-means-none": ("action=drop comment=", "action=drop"),
    "three-part-ipv4-is-a-hostname": ("action=accept dst4=1.2.3", "action=accept dsthost=1.2.3"),
    "empty-dsthost-is-accepted-by-qubesd": ("action=drop dsthost=", "action=drop dsthost="),
}


@pytest.mark.parametrize(("line", "rendered"), NORMALISED.values(), ids=NORMALISED.keys())
def test_rules_render_as_qubesd_does(line: str, rendered: str) -> None:
    assert Rule.from_api_string(line).api_string() == rendered


HOSTILE = {
    "unknown-key": "action=accept protoxyz=tcp dst4=127.0.0.1",
    "missing-action": "proto=tcp dstports=1-1024",
    "two-rules-on-one-line": "action=accept proto=tcp dstports=1-1024 action=drop",
    "repeated-key": "action=accept action=drop",
    "two-destinations": "action=accept dst4=1.2.3.4 dsthost=a.com",
    "two-destinations-aliases": "action=accept dst4=1.2.3.4 dst6=::1",
    "dsthost-then-dstname": "action=accept dsthost=a.com dstname=b.com",
    "dstports-without-proto": "action=accept dstports=80",
    "dstports-with-icmp": "action=accept proto=icmp dstports=80",
    "icmptype-without-proto": "action=accept icmptype=8",
    "icmptype-with-tcp": "action=accept proto=tcp icmptype=8",
    "option-without-equals": "action=accept tcp",
    "double-space": "action=accept  proto=tcp",
    "empty-line": "",
    "comment-only": "comment=hello",
    "bad-action": "action=allow",
    "bad-proto": "action=accept proto=sctp",
    "bad-specialtarget": "action=accept specialtarget=ntp",
    "uppercase-hostname": "action=accept dsthost=Example.com",
    "url-as-host": "action=accept dsthost=https://qubes-os.org",
    "ipv4-shortened": "action=accept dst4=127/8",
    "ipv4-octet-too-big": "action=accept dst4=137.327.0.0/16",
    "ipv4-five-parts": "action=accept dst4=1.2.3.4.5/32",
    "ipv4-prefix-33": "action=accept dst4=127.0.0.0/33",
    "ipv4-negative-prefix": "action=accept dst4=127.0.0.0/-1",
    "ipv4-empty-prefix": "action=accept dst4=127.0.0.0/",
    "ipv6-prefix-129": "action=accept dst6=2001:abcd:efab::3/129",
    "ipv6-bad-group": "action=accept dst6=2001:abcd:efgh::3/128",
    "ipv6-too-many-groups": "action=accept dst6=2001:abcd:efab:a:a:a:a:a:a:3/128",
    "two-slashes": "action=accept dst4=1.2.3.4/8/8",
    "hostname-with-prefix": "action=accept dsthost=example.com/24",
    "port-range-reversed": "action=accept proto=tcp dstports=100-20",
    "port-too-big": "action=accept proto=tcp dstports=65536",
    "port-huge": "action=accept proto=tcp dstports=1-1000000000000",
    "port-three-parts": "action=accept proto=tcp dstports=80-90-100",
    "port-not-number": "action=accept proto=tcp dstports=http",
    "port-negative": "action=accept proto=tcp dstports=-5",
    "icmptype-too-big": "action=accept proto=icmp icmptype=256",
    "icmptype-four-digits": "action=accept proto=icmp icmptype=0008",
    "icmptype-signed": "action=accept proto=icmp icmptype=+8",
    "expire-not-number": "action=accept expire=tomorrow",
    "expire-empty": "action=accept expire=",
    "expire-beyond-datetime": "action=accept expire=99999999999999999999",
    "strange-chars-in-value": "action=accept dsthost=a;b|c",
    "equals-in-value": "action=accept=drop",
    "comment-with-equals": "action=accept comment=a=b",
    "comment-swallows-options": "action=accept comment=x proto=tcp",
    "comment-with-quote": "action=accept comment=it's",
    "tab-in-value": "action=accept\tproto=tcp",
    "shell-metachar-in-comment": "action=accept comment=$(reboot)",
    "non-ascii-hostname": "action=accept dsthost=\u0430pple.com",
    "nul-in-address": "action=accept dst4=1.2.3.4\x00",
}


@pytest.mark.parametrize("line", HOSTILE.values(), ids=HOSTILE.keys())
def test_invalid_rule_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):  # qubesd raises plain ValueError
        Rule.from_api_string(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("action=accept foo=bar", "Unknown firewall option"),
        ("action=accept action=drop", "Option 'action' already set"),
        ("action=accept dst4=1.2.3.4 dst6=::1", "Option 'dsthost' already set"),
        ("action=accept dstports=80", "dstports valid only for 'tcp' and 'udp' protocols"),
        ("action=accept icmptype=8", "icmptype valid only for 'icmp' protocol"),
        ("action=accept dsthost=Ab", "Invalid hostname"),
        ("action=accept dst4=1.2.3.4/40", "netmask for IPv4 must be <= 32"),
        ("action=accept comment=a=b", "strange characters comment"),
        ("action=acc|ept", "strange characters in rule"),
        ("action=accept proto=tcp dstports=9-1", "Invalid port range"),
    ],
)
def test_error_messages_match_qubesd(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Rule.from_api_string(line)


def test_expired_is_strictly_before_now() -> None:
    rule = Rule.from_api_string("action=drop expire=1000")
    assert rule.expired(1000.5)
    assert not rule.expired(1000.0)
    assert not Rule.from_api_string("action=drop").expired(1e12)


# --- property-based ------------------------------------------------------------------------

_octet = st.integers(0, 255).map(str)
_ipv4 = st.tuples(_octet, _octet, _octet, _octet).map(".".join)
_hostname = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=20).filter(
    lambda s: s.count(".") != 3 or not all(p.isdigit() for p in s.split("."))
)
_dst = st.one_of(
    st.none(),
    st.tuples(st.just("dst4"), _ipv4, st.integers(0, 32)).map(lambda t: (t[0], f"{t[1]}/{t[2]}")),
    st.tuples(st.just("dsthost"), _hostname),
    st.just(("dst6", "fd00::/8")),
)
_comment = st.one_of(
    st.none(),
    st.text("abcXYZ0189:;,./-_[] ", min_size=1, max_size=30),  # qubesd's comment charset (no '=')
)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp"]))
    ports = None
    icmptype = None
    if proto in ("tcp", "udp"):
        ports = draw(
            st.one_of(
                st.none(),
                st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
                    lambda t: (min(t), max(t))
                ),
            )
        )
    if proto == "icmp":
        icmptype = draw(st.one_of(st.none(), st.integers(0, 255)))
    dst = draw(_dst)
    return Rule(
        action=draw(st.sampled_from(["accept", "drop"])),
        expire=draw(st.one_of(st.none(), st.integers(0, 4_000_000_000).map(str))),
        dst_type=None if dst is None else dst[0],
        dst=None if dst is None else dst[1],
        proto=proto,
        specialtarget=draw(st.sampled_from([None, "dns"])),
        dstports=ports,
        icmptype=icmptype,
        comment=draw(_comment),
    )


@given(rules())
def test_parse_of_render_is_identity(rule: Rule) -> None:
    assert Rule.from_api_string(rule.api_string()) == rule


_TOKENS = st.sampled_from(
    [
        "action=",
        "accept",
        "drop",
        "proto=",
        "tcp",
        "icmp",
        "dst4=",
        "dst6=",
        "dsthost=",
        "dstname=",
        "dstports=",
        "icmptype=",
        "expire=",
        "specialtarget=",
        "comment=",
        " ",
        "=",
        "/",
        "-",
        ".",
        ":",
        "1",
        "255",
        "65536",
        "a",
        "\t",
        "\x00",
        "é",
    ]
)


@given(st.one_of(st.lists(_TOKENS, max_size=14).map("".join), st.text(max_size=60)))
def test_random_input_raises_only_value_error(text: str) -> None:
    try:
        rule = Rule.from_api_string(text)
    except ValueError:
        return
    # Anything accepted renders to a line that parses back to the same rule.
    assert Rule.from_api_string(rule.api_string()) == rule
