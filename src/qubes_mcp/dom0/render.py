"""The generated qrexec policy: rendered from the configuration, the operations table and the
enrolment registry (``enrolment.py``).

The operator never edits it; the gate re-renders and replaces it whenever the registry changes.
It sorts before ``30-user.policy``, Global Config's ``50-config-*`` and the stock files, so
no rule written for the operator's own qubes reaches a principal or a registered qube
(decision record 0016); ``doctor`` lists the operator's rules it shadows. It says, for each
principal and each scope:

- a principal may call exactly its ``qmcp.*`` services (those its ceiling and ``may_create``
  permit) -- global ones on ``@adminvm``, per-qube ones only on the **registered names** of its
  scope, one line per name -- always with ``target=@adminvm``, so qrexec never starts the
  target; then everything else from that principal is denied, dom0 included;
- each registered sandbox qube (member or dump sink), named one by one, may call only the
  housekeeping services a qube needs; a registered template also ``qubes.SyncAppMenus`` and,
  through its scope's egress qube (``Principal.egress_qube``; one per scope),
  ``qubes.UpdatesProxy``; then everything else from it is denied.
  No sandbox qube may call another qube (copies are relayed by dom0), with one exception: a
  lab link the operator approved (``link.open``, decision record 0018) renders exactly one
  line ``qubes.ConnectTCP +PORT CLIENT SERVER allow``, naming both registered qubes and the
  port, before the client's deny lines. Never a tag, ``@anyvm``, ``*`` or another service;
  a link whose ends are not both registered members of the scope renders nothing.

No line is keyed on a tag: Qubes copies tags into disposables and clones, so a tag-keyed line
would open paths to qubes the operator made (decision record 0010).

Oracle-free targets. No allow line names a target that could match a qube the caller cannot
see. ``@anyvm`` and ``*`` are never an allow target: they match ``@dispvm:X``, which qrexec
accepts only when X exists as a disposable template and refuses up front otherwise -- an
existence oracle. ``@default`` alone is never an allow target either: qrexec turns a name that
does not exist into ``@default``, so it would allow a made-up name and deny an existing one.
Where a service must accept "any target but dom0" (``qubes.GetDate``: ``qvm-sync-clock`` asks
for ``@default``; ``qubes.UpdatesProxy``: templates ask for ``@default``) the rule lists
``ANY_NON_DOM0``: ``@default`` plus every non-dom0 ``@type:``. An existing name matches its
type, a missing one is ``@default``, so both are allowed alike, and ``@dispvm…`` matches none
of them. The text is validated with the project's own policy engine before anyone writes it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from qubes_mcp.dom0.config import GateConfig, Principal
from qubes_mcp.dom0.enrolment import Registry
from qubes_mcp.dom0.operations import OPERATIONS, Target
from qubes_mcp.dom0.tiers import MEMBER, Scope
from qubes_mcp.policy import Policy, PolicySyntaxError

POLICY_NAME = "25-qubes-mcp.policy"
#: names the generated file had before; install and uninstall remove them (decision 0016)
FORMER_POLICY_NAMES = ("30-qubes-mcp.policy",)
#: dom0 services every qube calls just to run (R4.3 stock policy allows them to all qubes)
HOUSEKEEPING = (
    "qubes.FeaturesRequest",
    "qubes.NotifyTools",
    "qubes.NotifyUpdates",
    "qubes.GetRandomizedTime",
)
#: stock R4.3 lets templates only sync their menus into dom0 (never app qubes or disposables)
TEMPLATE_ONLY = ("qubes.SyncAppMenus",)
#: the one service a sandbox qube may call on another: a lab link (decision record 0018)
CONNECT_TCP = "qubes.ConnectTCP"
#: every class a non-dom0 qube can have (qubes-core-admin ``qubes.vm`` entry points, and
#: Qubes Air's RemoteVM); with @default they match every existing or missing non-dom0 name
NON_DOM0_CLASSES = ("AppVM", "DispVM", "TemplateVM", "StandaloneVM", "RemoteVM")
ANY_NON_DOM0 = ("@default", *(f"@type:{k}" for k in NON_DOM0_CLASSES))


def _row(*cols: str) -> str:
    """One rule, columns separated by one space: the file grows as principals x enrolled qubes
    x operations (names only, never a tag), so alignment padding would cost a third of it
    (3 principals x 1,000 qubes stay well inside the policy engine's 4 MiB per file)."""
    return " ".join(cols)


def _getdate(source: str) -> list[str]:
    lines = [_row("qubes.GetDate", "*", source, "@adminvm", "allow")]
    lines += [
        _row("qubes.GetDate", "*", source, t, "allow", "target=@adminvm") for t in ANY_NON_DOM0
    ]
    return lines


def _deny_all(source: str) -> list[str]:
    return [_row("*", "*", source, "@adminvm", "deny"), _row("*", "*", source, "@anyvm", "deny")]


def _principal_block(p: Principal, registry: Registry) -> list[str]:
    members = sorted(registry.members(p.scope.prefix))
    lines = [f"## principal {p.qube}: scope {p.scope.prefix}, ceiling {p.ceiling.word}"]
    for op in OPERATIONS:
        if op.floor > p.ceiling or (op.creates and not p.may_create):
            continue  # the gate would refuse it anyway; qrexec refuses it first
        targets = ["@adminvm"] if op.target is Target.GLOBAL else members
        for target in targets:
            lines.append(_row(op.service, "*", p.qube, target, "allow", "target=@adminvm"))
    for service in HOUSEKEEPING:
        lines.append(_row(service, "*", p.qube, "@adminvm", "allow"))
    lines += _getdate(p.qube)
    return lines + _deny_all(p.qube)


def _link_lines(scope: Scope, registry: Registry, client: str) -> list[str]:
    """One allow line per lab link from ``client``: both qubes and the port, by name."""
    members = registry.members(scope.prefix)
    return [
        _row(CONNECT_TCP, f"+{link.port}", link.client, link.server, "allow")
        for link in sorted(registry.links(scope.prefix), key=lambda k: (k.server, k.port, k.id))
        if link.client == client
        and link.client in members
        and link.server in members
        and link.client != link.server
        and 1 <= link.port <= 65535
    ]


def _sandbox_block(scope: Scope, registry: Registry, egress: str | None) -> list[str]:
    lines = [f"## registered qubes of scope {scope.prefix} as sources: housekeeping, links"]
    for name, entry in registry.entries(scope.prefix).items():
        for service in HOUSEKEEPING:
            lines.append(_row(service, "*", name, "@adminvm", "allow"))
        lines += _getdate(name)
        template = entry.role == MEMBER and entry.klass == "TemplateVM"
        if template:
            for service in TEMPLATE_ONLY:
                lines.append(_row(service, "*", name, "@adminvm", "allow"))
        if template and entry.by == "operator" and egress is not None and name != egress:
            lines += [
                _row("qubes.UpdatesProxy", "*", name, t, "allow", f"target={egress}")
                for t in ANY_NON_DOM0
            ]
        lines += _link_lines(scope, registry, name)
        lines += _deny_all(name)
    return lines


def render_policy(config: GateConfig, registry: Registry) -> str:
    """The policy text for ``config`` and ``registry`` (not yet validated)."""
    out = [
        f"# {POLICY_NAME} -- generated by qubes-mcp-admin from {config.source}",
        "# and the enrolment registry. Do not edit: `qubes-mcp-admin enrol|unenrol|install`.",
        "# Your own exceptions for these qubes belong in a file that sorts earlier",
        "# (e.g. 20-qubes-mcp-local.policy); `qubes-mcp-admin doctor` lists what this shadows.",
        "",
    ]
    for principal in config.principals.values():
        out += [*_principal_block(principal, registry), ""]
    seen: set[str] = set()
    for principal in config.principals.values():
        if principal.scope.prefix not in seen:
            seen.add(principal.scope.prefix)
            out += [*_sandbox_block(principal.scope, registry, principal.egress_qube), ""]
    return "\n".join(out)


def validated_policy(
    config: GateConfig, registry: Registry, others: dict[str, str] | None = None
) -> str:
    """Render and parse with our engine (alongside the other files of the directory).

    Raises:
        PolicySyntaxError: the rendered text (or the directory with it) does not parse.
    """
    text = render_policy(config, registry)
    Policy.from_texts({**(others or {}), POLICY_NAME: text})
    return text


def stage_policy(policy_dir: Path, text: str) -> str:
    """Validate ``text`` as ``POLICY_NAME`` together with every other file of ``policy_dir``
    (a copy of it, so includes resolve as they will); returns ``text``.

    Raises:
        PolicySyntaxError: naming the file and line.
    """
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-policy-") as tmp:
        staged = Path(tmp) / "policy.d"
        if policy_dir.is_dir():
            shutil.copytree(policy_dir, staged, symlinks=True)
        staged.mkdir(exist_ok=True)
        (staged / POLICY_NAME).write_text(text)
        Policy.load([staged])
    return text


__all__ = [
    "ANY_NON_DOM0",
    "CONNECT_TCP",
    "FORMER_POLICY_NAMES",
    "POLICY_NAME",
    "PolicySyntaxError",
    "render_policy",
    "stage_policy",
    "validated_policy",
]
