"""``qubes-mcp-admin doctor``: find the misconfigurations that quietly weaken the boundary.

Reads the configuration, the installed files, the enrolment registry and the live fleet
(through qubesd, as dom0) and reports each finding with what to do about it. It changes
nothing. Scope tags on a qube that is not registered are errors: Qubes copies tags into
disposables and clones, so they are usually the operator's own qubes (decision record 0010).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.config import GateConfig, Principal, load_config
from qubes_mcp.dom0.enrolment import Registry, live_uuids, registry_path
from qubes_mcp.dom0.errors import GateError
from qubes_mcp.dom0.operator.install import Layout, status
from qubes_mcp.dom0.operator.policy_overlap import describe, overlaps
from qubes_mcp.dom0.reader import parse_getall
from qubes_mcp.dom0.render import POLICY_NAME
from qubes_mcp.dom0.tiers import Tier
from qubes_mcp.policy import Policy, PolicyError


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" (the boundary is weaker than configured) or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


def _install_findings(root: Path) -> list[Finding]:
    report = status(root)
    found = []
    if not report["policy"]:
        found.append(Finding("error", "the generated policy is not installed (run install)"))
    elif not report.get("policy_current", False):
        found.append(
            Finding(
                "error",
                "the installed policy differs from what the config "
                "renders (policy drift: run install)",
            )
        )
    if report["links"] != f"{len(Layout(root).links())}/{len(Layout(root).links())}":
        found.append(Finding("error", f"qmcp.* service links incomplete ({report['links']})"))
    return found


async def _fleet_findings(config: GateConfig) -> list[Finding]:
    client = AdminClient(config.paths.qubesd_socket)
    registry = Registry.load(registry_path(config.paths.state_dir))
    live = await live_uuids(client)
    found: list[Finding] = []
    for principal in config.principals.values():
        scope = principal.scope
        if principal.qube not in live:
            found.append(Finding("error", f"principal {principal.qube} does not exist"))
        for name, entry in registry.entries(scope.prefix).items():
            if name not in live:
                why = "but no longer exists (the gate drops it on start or on domain-delete)"
                found.append(Finding("warning", f"{name} is registered in {scope.prefix} {why}"))
            elif live[name] != entry.uuid:
                why = (
                    "under another uuid: it was removed and re-created, so it is not in scope "
                    f"(unenrol it, or enrol the new {name})"
                )
                found.append(Finding("error", f"{name} is registered in {scope.prefix} {why}"))
        enrolled = set()
        tier_words = {t for t in (scope.tier_tag(x) for x in Tier) if t}
        for name in sorted(set(live) - {"dom0"}):
            tags = frozenset(await client.lines(name, "admin.vm.tag.List"))
            role = registry.role_of(scope.prefix, name, live[name])
            marks = sorted((tier_words | {scope.managed, scope.dump}) & tags)
            if role is None and marks:
                why = (
                    f"but is not enrolled in {scope.prefix}: tags copied from an enrolled qube "
                    "(a disposable or clone?); not in scope; remove the tags or enrol it"
                )
                found.append(Finding("error", f"{name} carries {', '.join(marks)} {why}"))
            if role is not None and not (
                scope.is_enrolled(tags, role) or scope.is_dump_sink(tags, role)
            ):
                why = (
                    f"but its tags disagree ({', '.join(marks) or 'none'}): the gate treats it "
                    "as out of scope (run enrol or unenrol)"
                )
                found.append(
                    Finding("error", f"{name} is registered in {scope.prefix} as a {role} {why}")
                )
            if scope.managed in tags and scope.dump in tags:
                found.append(
                    Finding(
                        "error",
                        f"{name} is both enrolled and a dump sink; the gate treats it as neither",
                    )
                )
            if scope.is_enrolled(tags, role):
                enrolled.add(name)
            elif name.startswith(principal.name_prefix) and name != principal.qube:
                found.append(
                    Finding(
                        "warning",
                        f"{name} is inside {principal.qube}'s name "
                        "prefix but not enrolled: a create with that "
                        "name is refused as a conflict (rename it)",
                    )
                )
            if name == principal.qube and scope.is_enrolled(tags, role):
                found.append(
                    Finding("error", f"the control qube {name} is enrolled in its own scope")
                )
        egress = principal.egress_qube
        if egress is not None:
            found += await _egress_findings(client, principal, egress, live, enrolled)
        for name in sorted((enrolled | {principal.qube}) & set(live)):
            props = parse_getall(await client.call(name, "admin.vm.property.GetAll"))
            netvm = props["netvm"].value if "netvm" in props else ""
            if name == egress or not netvm:
                continue
            if netvm != egress and netvm not in enrolled:
                who = "the control qube" if name == principal.qube else "enrolled qube"
                found.append(
                    Finding(
                        "warning",
                        f"{who} {name} reaches the network through {netvm}, not the egress qube",
                    )
                )
    return found


async def _egress_findings(
    client: AdminClient, principal: Principal, egress: str, live: dict[str, str], enrolled: set[str]
) -> list[Finding]:
    """A principal's egress qube: it exists, is enrolled in the principal's scope (creates
    check that, and refuse a networked birth otherwise), provides network, and runs the
    updates proxy its scope's templates are sent to (``qubes.UpdatesProxy``)."""
    who = f"egress qube {egress} of {principal.qube}"
    if egress not in live:
        return [Finding("error", f"{who} does not exist (networked creates are refused)")]
    found = []
    if egress not in enrolled:
        found.append(
            Finding(
                "error",
                f"{who} is not enrolled in {principal.scope.prefix} "
                "(networked creates are refused: enrol it)",
            )
        )
    props = parse_getall(await client.call(egress, "admin.vm.property.GetAll"))
    if "provides_network" not in props or props["provides_network"].value != "True":
        found.append(Finding("error", f"{who} does not provide network (provides_network)"))
    features = await client.lines(egress, "admin.vm.feature.List")
    proxy = "service.qubes-updates-proxy"
    if proxy not in features or (
        await client.call(egress, "admin.vm.feature.Get", proxy) in ("", "0")
    ):
        found.append(
            Finding(
                "warning",
                f"{who} does not run the updates proxy (template.update fails): "
                f"qvm-service --enable {egress} qubes-updates-proxy",
            )
        )
    return found


async def _birth_leftover_findings(config: GateConfig) -> list[Finding]:
    """Qubes that still carry a birth marker (create.py): a birth the gate never finished.

    The marker is the last thing a birth removes, and start-up recovery removes what a stopped
    gate left; one that remains means recovery could not act (qubesd was down, the audit log
    refused) or the request is older than its journal window (dom0/journal.py).
    """
    from qubes_mcp.dom0.create import BIRTH_TAG_PREFIX

    client = AdminClient(config.paths.qubesd_socket)
    found: list[Finding] = []
    for line in await client.lines("dom0", "admin.vm.List"):
        name = line.partition(" ")[0]
        if name == "dom0":
            continue
        tags = set(await client.lines(name, "admin.vm.tag.List"))
        for marker in sorted(t for t in tags if t.startswith(BIRTH_TAG_PREFIX)):
            request = marker.removeprefix(BIRTH_TAG_PREFIX)
            found.append(
                Finding(
                    "error",
                    f"{name} is a qube the gate never finished creating (request {request}, "
                    "see the audit log); it holds its name and may not be what was decided: "
                    f"restart the gate (recovery removes it) or `qvm-remove {name}`",
                )
            )
    return found


async def _policy_findings(config: GateConfig) -> list[Finding]:
    """The operator's own qrexec rules that the generated file overrides or is overridden by,
    for each principal and each registered qube (``policy_overlap``, decision record 0016)."""
    from qubes_mcp.dom0.operator.explain import system_info

    try:
        policy = Policy.load([config.paths.policy_dir])
    except PolicyError as exc:
        return [Finding("error", f"the qrexec policy does not load (qrexec denies all): {exc}")]
    registry = Registry.load(registry_path(config.paths.state_dir))
    qubes = {name: "enrolled" for scope in registry.scopes() for name in registry.entries(scope)}
    qubes.update({p.qube: "principal" for p in config.principals.values()})
    try:
        info = await system_info(config)
    except PolicyError as exc:  # qubesd's system info does not parse
        return [Finding("error", f"cannot read the fleet as qrexec sees it: {exc}")]
    return [
        Finding(severity, message)
        for severity, message in describe(overlaps(policy, POLICY_NAME, qubes, info), POLICY_NAME)
    ]


async def _gate_findings(config: GateConfig) -> list[Finding]:
    """Whether the gate answers on its operator socket, and runs the configuration on disk
    (an edit not yet reloaded means agents are still held to the old rules)."""
    from qubes_mcp.dom0.daemon import operator_call

    socket = config.paths.operator_socket
    try:
        answer = await operator_call(socket, {"cmd": "status"})
    except (OSError, ValueError):
        return [
            Finding(
                "error",
                f"the gate is not running (its operator socket {socket} does not answer): "
                "every agent request fails; start it (systemctl start qubes-mcp-gate)",
            )
        ]
    if answer.get("mode") == "refuse-all":
        why = answer.get("config_error")
        return [Finding("error", f"the gate refuses every request: its configuration: {why}")]
    running = answer.get("config_sha256")
    if running != config.digest:
        return [
            Finding(
                "error",
                f"the running gate's configuration (sha256 {running}) differs from "
                f"{config.source} (sha256 {config.digest}): the edit is not in effect; "
                "run `qubes-mcp-admin reload` (install does it too)",
            )
        ]
    return []


async def doctor(root: Path, config_path: Path) -> list[Finding]:
    try:
        config = load_config(config_path)
    except GateError as exc:
        return [Finding("error", f"configuration: {exc}")]
    findings = _install_findings(root) + await _gate_findings(config)
    try:
        findings += await _fleet_findings(config)
        findings += await _birth_leftover_findings(config)
        findings += await _policy_findings(config)
    except GateError as exc:
        findings.append(Finding("error", f"cannot read the fleet from qubesd ({exc.reason})"))
    return findings
