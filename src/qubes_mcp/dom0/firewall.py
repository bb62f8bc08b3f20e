"""Firewall rules as the agent writes them (JSON objects) and as qubesd stores them (lines).

The gate validates every rule itself, at least as strictly as qubesd's
``qubes/firewall.py``, and renders it in qubesd's canonical order
(``action``, destination/``proto``/``specialtarget``, ``dstports``/``icmptype``, ``comment``),
so the rules it sends can be compared with the rules it reads back. ``expire`` is not offered
to agents: a rule that silently vanishes later is not something an operator approved.
"""

from __future__ import annotations

import ipaddress
import re

_HOST_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,252}\Z")
_COMMENT_RE = re.compile(r"\A[A-Za-z0-9:;,./_\[\] -]{0,128}\Z")
_PORTS_RE = re.compile(r"\A([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")
_KEYS = (
    "action",
    "proto",
    "dst4",
    "dst6",
    "dsthost",
    "dstports",
    "icmptype",
    "specialtarget",
    "comment",
)
_DESTINATIONS = ("dst4", "dst6", "dsthost")


class FirewallRuleError(ValueError):
    """A rule the gate will not send to qubesd; the message names the problem."""


def _network(key: str, value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise FirewallRuleError(f"{key} must be an address or network") from None
    if (key == "dst4") != (net.version == 4):
        raise FirewallRuleError(f"{key} has the wrong address family")
    if net.version == 4 and str(net.network_address).count(".") != 3:
        raise FirewallRuleError(f"{key} must be a dotted IPv4 address")
    return f"{net.network_address}/{net.prefixlen}"


def _ports(value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    m = _PORTS_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise FirewallRuleError("dstports must be a port or a range N-M")
    low = int(m.group(1))
    high = int(m.group(2) or low)
    if not 0 <= low <= high <= 65535:
        raise FirewallRuleError("dstports must be within 0-65535, low to high")
    return f"{low}-{high}"


def parse_rule_object(untrusted_rule: object) -> dict[str, object]:
    """Check one agent-supplied rule object; returns it normalised (canonical values)."""
    if not isinstance(untrusted_rule, dict):
        raise FirewallRuleError("each rule must be an object")
    for key in untrusted_rule:
        if key not in _KEYS:
            raise FirewallRuleError(f"unknown key (allowed: {', '.join(_KEYS)})")
    rule: dict[str, object] = {}
    action = untrusted_rule.get("action")
    if action not in ("accept", "drop"):
        raise FirewallRuleError("action must be accept or drop")
    rule["action"] = action
    proto = untrusted_rule.get("proto")
    if proto is not None:
        if proto not in ("tcp", "udp", "icmp"):
            raise FirewallRuleError("proto must be tcp, udp or icmp")
        rule["proto"] = proto
    destinations = [k for k in _DESTINATIONS if untrusted_rule.get(k) is not None]
    if len(destinations) > 1:
        raise FirewallRuleError("give at most one of dst4, dst6, dsthost")
    for key in destinations:
        value = untrusted_rule[key]
        if not isinstance(value, str):
            raise FirewallRuleError(f"{key} must be a string")
        if key == "dsthost":
            if not _HOST_RE.match(value):
                raise FirewallRuleError("dsthost must be a lower-case host name")
            rule[key] = value
        else:
            rule[key] = _network(
                key, value if "/" in value else f"{value}/{32 if key == 'dst4' else 128}"
            )
    if untrusted_rule.get("specialtarget") is not None:
        if untrusted_rule["specialtarget"] != "dns":
            raise FirewallRuleError("specialtarget must be dns")
        rule["specialtarget"] = "dns"
    if untrusted_rule.get("dstports") is not None:
        if proto not in ("tcp", "udp"):
            raise FirewallRuleError("dstports needs proto tcp or udp")
        rule["dstports"] = _ports(untrusted_rule["dstports"])
    if untrusted_rule.get("icmptype") is not None:
        icmptype = untrusted_rule["icmptype"]
        if proto != "icmp":
            raise FirewallRuleError("icmptype needs proto icmp")
        if isinstance(icmptype, bool) or not isinstance(icmptype, int) or not 0 <= icmptype <= 255:
            raise FirewallRuleError("icmptype must be an integer 0-255")
        rule["icmptype"] = icmptype
    if untrusted_rule.get("comment") is not None:
        comment = untrusted_rule["comment"]
        if not isinstance(comment, str) or not _COMMENT_RE.match(comment):
            raise FirewallRuleError("comment may hold letters, digits, spaces and :;,./-_[]")
        rule["comment"] = comment
    return rule


def render_rule(rule: dict[str, object]) -> str:
    """One qubesd rule line in its canonical key order."""
    parts = [f"action={rule['action']}"]
    middle = sorted(k for k in ("dst4", "dst6", "dsthost", "proto", "specialtarget") if k in rule)
    parts += [f"{k}={rule[k]}" for k in middle]
    parts += [f"{k}={rule[k]}" for k in ("dstports", "icmptype") if k in rule]
    if "comment" in rule:
        parts.append(f"comment={rule['comment']}")
    return " ".join(parts)


def render_rules(rules: list[dict[str, object]]) -> bytes:
    """The ``admin.vm.firewall.Set`` payload."""
    return "".join(render_rule(r) + "\n" for r in rules).encode("ascii")


def parse_rule_line(line: str) -> dict[str, object]:
    """A qubesd ``admin.vm.firewall.Get`` line as an object (for reads; qubesd is trusted)."""
    rule: dict[str, object] = {}
    head, sep, comment = line.partition(" comment=")
    for item in head.split():
        key, _, value = item.partition("=")
        rule[key] = int(value) if key in ("icmptype", "expire") and value.isdigit() else value
    if sep:
        rule["comment"] = comment
    return rule
