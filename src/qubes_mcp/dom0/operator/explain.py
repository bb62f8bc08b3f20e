"""``qubes-mcp-admin policy explain``: what each principal and sandbox qube may call, where.

It evaluates the installed policy directory with the project's own engine against the live
fleet (``internal.GetSystemInfo``), for the gate's services and for the qrexec services a
hostile sandbox qube would try, and prints, per calling qube, the targets each reaches. The
calling qubes are the principals, the registered qubes of each scope, and every qube that
carries a scope tag without being registered (it should reach nothing through our file).
"""

from __future__ import annotations

import json
from pathlib import Path

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.enrolment import Registry, registry_path
from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.dom0.operator.install import Layout
from qubes_mcp.policy import AccessDenied, AllowResolution, Policy, SystemInfo

PROBED_SERVICES = (
    "qubes.VMShell",
    "qubes.VMExec",
    "qubes.Filecopy",
    "qubes.OpenInVM",
    "qubes.OpenURL",
    "qubes.StartApp",
    "qubes.UpdatesProxy",
    "qubes.GetDate",
    "admin.vm.List",
    "admin.vm.property.Set",
)
PSEUDO_TARGETS = ("@dispvm", "@default", "@adminvm")
#: a qube the operator cannot have: shows what a made-up name reaches (it must equal a hidden one)
MADE_UP = "qubes-mcp-no-such-qube"


async def system_info(config: GateConfig) -> SystemInfo:
    internal = AdminClient(config.paths.qubesd_socket.with_name("qubesd.internal.sock"))
    raw = await internal.call("dom0", "internal.GetSystemInfo")
    return SystemInfo.from_json(json.loads(raw))


def reachable(
    policy: Policy, info: SystemInfo, source: str, service: str, targets: list[str]
) -> list[str]:
    found = []
    for target in targets:
        try:
            res = policy.evaluate(
                service=service, argument="+", source=source, target=target, system_info=info
            )
        except AccessDenied:
            continue
        if isinstance(res, AllowResolution):
            found.append(target if res.target == target else f"{target}->{res.target}")
        else:
            found.append(f"{target}(ask)")
    return found


async def explain(config: GateConfig, layout: Layout, source: str | None) -> str:
    info = await system_info(config)
    dirs = [layout.policy_dir]
    if layout.root == Path("/"):
        dirs.insert(0, Path("/run/qubes/policy.d"))
    policy = Policy.load([d for d in dirs if d.is_dir()])
    names = sorted(d.name for d in info.domains())
    if source is not None:
        sources = [source]
    else:
        # the registered qubes, and every qube carrying a scope tag without a registration
        # (an operator's disposable or clone): the policy must give the latter nothing
        scopes = {p.scope for p in config.principals.values()}
        registry = Registry.load(registry_path(config.paths.state_dir))
        sources = [*config.principals]
        sources += [n for s in scopes for n in registry.entries(s.prefix)]
        sources += [
            d.name
            for d in info.domains()
            if any(s.managed in d.tags or s.dump in d.tags for s in scopes)
        ]
    services = [op.service for op in OPERATIONS] + list(PROBED_SERVICES)
    out = []
    for src in sorted(dict.fromkeys(sources)):
        out.append(f"{src}:")
        for service in services:
            hits = reachable(policy, info, src, service, [*names, *PSEUDO_TARGETS, MADE_UP])
            if hits:
                out.append(f"  {service:<24} {' '.join(hits)}")
        if out[-1] == f"{src}:":
            out.append("  (nothing)")
    return "\n".join(out)
