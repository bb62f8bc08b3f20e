"""Where the operator's own qrexec rules meet the generated policy file (decision record 0016).

The generated file sorts before ``30-user.policy`` and Global Config's ``50-config-*`` files,
so for the principals and the enrolled qubes it decides first: a rule the operator wrote
later for them (the clipboard from ``mcp-control``, a split-GPG ``@anyvm`` allow) no longer
applies -- it is *shadowed*. A rule in a file that sorts before ours decides before ours --
it *overrides* the generated file, and an allow or ask there widens the boundary.

Both are found by evaluating, not by reading text: for each of the operator's rules and
each principal or enrolled qube its source column matches, we build the requests that rule
matches (its service, argument, and each target of the fleet) and ask the policy engine
(``qubes_mcp.policy``) which rule decides. Stock files are left out: our file shadows their
``@anyvm`` rules on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath

from qubes_mcp.policy import AccessDenied, DenyAction, Policy, Rule, SystemInfo

#: files Qubes itself ships into /etc/qubes/policy.d (qubes-internals §5.1); not the operator's
STOCK_FILES = frozenset(
    {
        "35-compat.policy",
        "85-admin-backup-restore.policy",
        "90-admin-default.policy",
        "90-admin-policy-default.policy",
        "90-default.policy",
        "91-admin-default-deny.policy",
    }
)
#: stands for "any service" when the operator's rule says ``*``
ANY_SERVICE = "qubes.VMShell"


@dataclass(frozen=True)
class Overlap:
    """One of the operator's rules that meets the generated file for one qube.

    ``kind`` is ``"overrides"`` (the rule decides before ours) or ``"shadowed"`` (ours decides
    first, so the rule no longer applies to ``qube``). ``explicit``: the rule names ``qube``
    literally, rather than reaching it through ``@anyvm``, ``@tag:`` or ``@type:``.
    """

    kind: str
    qube: str
    role: str
    rule: Rule
    explicit: bool

    @property
    def widens(self) -> bool:
        """An override that lets ``qube`` do more than the generated file does."""
        return self.kind == "overrides" and not isinstance(self.rule.action, DenyAction)

    def where(self) -> str:
        return f"{PurePath(self.rule.filepath).name}:{self.rule.lineno}"


def _is_ours(rule: Rule, ours: str) -> bool:
    return PurePath(rule.filepath).name == ours


def _is_stock(rule: Rule) -> bool:
    path = PurePath(rule.filepath)
    return path.name in STOCK_FILES or (path.parent.name == "include" and "admin-" in path.name)


def _targets(info: SystemInfo, source: str) -> list[str]:
    names = sorted(n for n in info if n not in (source, "dom0"))
    return ["@adminvm", *names, "@default", "@dispvm"]


def _decides(policy: Policy, rule: Rule, source: str, target: str, info: SystemInfo) -> Rule | None:
    """Which rule decides the request ``rule`` describes for ``source`` → ``target``, if ``rule``
    matches it at all (None otherwise)."""
    service = rule.service or ANY_SERVICE
    argument = rule.argument or "+"
    try:
        Policy([rule]).find_rule(
            service=service, argument=argument, source=source, target=target, system_info=info
        )
    except AccessDenied:
        return None
    try:
        return policy.find_rule(
            service=service, argument=argument, source=source, target=target, system_info=info
        )
    except AccessDenied:
        return None


def overlaps(
    policy: Policy, ours: str, qubes: Mapping[str, str], info: SystemInfo
) -> list[Overlap]:
    """Every (operator rule, qube) pair where the rule overrides or is shadowed by ``ours``.

    Args:
        policy: the whole installed policy directory, ours included.
        ours: the generated file's name (``render.POLICY_NAME``).
        qubes: name → role ("principal", "enrolled") of every qube the generated file names.
        info: the fleet, as the policy daemon sees it.
    """
    positions = [i for i, r in enumerate(policy.rules) if _is_ours(r, ours)]
    if not positions:
        return []
    first, last = positions[0], positions[-1]
    found: list[Overlap] = []
    for index, rule in enumerate(policy.rules):
        if _is_ours(rule, ours) or _is_stock(rule):
            continue
        for qube, role in sorted(qubes.items()):
            kind = _meeting(
                policy, rule, qube, info, ours=ours, before=index < first, after=index > last
            )
            if kind is not None:
                explicit = rule.source.text == qube
                found.append(Overlap(kind, qube, role, rule, explicit))
    return found


def _meeting(
    policy: Policy,
    rule: Rule,
    qube: str,
    info: SystemInfo,
    *,
    ours: str,
    before: bool,
    after: bool,
) -> str | None:
    for target in _targets(info, qube):
        decided = _decides(policy, rule, qube, target, info)
        if decided is None:
            continue
        if before and decided is rule:
            return "overrides"
        if after and decided is not rule and _is_ours(decided, ours):
            return "shadowed"
    return None


def describe(found: Iterable[Overlap], ours: str) -> list[tuple[str, str]]:
    """(severity, message) for each overlap, in words an operator acts on."""
    out = []
    for o in found:
        who = "the control qube" if o.role == "principal" else "enrolled qube"
        rule = " ".join(str(o.rule).split())
        if o.kind == "shadowed":
            out.append(
                (
                    "warning",
                    f"{o.where()} `{rule}` no longer applies to {who} {o.qube}: {ours} decides "
                    f"first. If you mean it for {o.qube}, move it to a file that sorts before "
                    f"{ours} (e.g. 20-qubes-mcp-local.policy)",
                )
            )
        elif not o.widens:
            out.append(
                ("warning", f"{o.where()} `{rule}` decides before {ours} for {who} {o.qube}")
            )
        elif o.explicit:
            out.append(
                (
                    "warning",
                    f"{o.where()} `{rule}` is an exception for {who} {o.qube}: it decides "
                    f"before {ours} and lets {o.qube} call beyond what qubes-mcp grants",
                )
            )
        else:
            out.append(
                (
                    "error",
                    f"{o.where()} `{rule}` reaches {who} {o.qube} through "
                    f"{o.rule.source.text} and decides before {ours}: it widens the boundary "
                    f"(name {o.qube} explicitly if you mean it, or move the rule after {ours})",
                )
            )
    return out
