"""The generated policy, loaded together with the emulator's stock-like R4.3 defaults, keeps
principals and sandbox qubes inside the lines DESIGN.md section 5 draws.

Each case is an attack a hostile agent (root in the control qube) or a hostile sandbox qube
(root inside it, calling qrexec itself) would try; the stock policy allows several of them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.dom0.render import POLICY_NAME, validated_policy
from qubes_mcp.policy import AccessDenied, AllowResolution, Policy, SystemInfo
from tests.gate_fixtures import config, demo_qubes

STOCK = Path(__file__).resolve().parents[2] / "src" / "qubes_mcp" / "sim" / "data" / "policy.d"


_TMP = tempfile.TemporaryDirectory(prefix="qmcp-policy-")


def _load(*, ours: bool) -> Policy:
    """The stock directory (with its include/ files), plus our generated file."""
    root = Path(_TMP.name) / ("with-ours" if ours else "stock")
    if not root.exists():
        shutil.copytree(STOCK, root)
        if ours:
            (root / POLICY_NAME).write_text(validated_policy(config()))
    return Policy.load([root])


def _system_info() -> SystemInfo:
    domains = {}
    extra = {
        "personal": ("AppVM", []),
        "default-dvm": ("AppVM", []),
        "mcp-control": ("AppVM", []),
        "auditor": ("AppVM", []),
        "sys-net": ("AppVM", []),
    }
    for q in demo_qubes():
        domains[q.name] = {
            "type": q.klass,
            "tags": sorted(q.tags),
            "template_for_dispvms": q.flag("template_for_dispvms"),
            "default_dispvm": "default-dvm",
            "internal": False,
            "power_state": "Running",
        }
    for name, (klass, tags) in extra.items():
        domains[name] = {
            "type": klass,
            "tags": tags,
            "default_dispvm": "default-dvm",
            "template_for_dispvms": name == "default-dvm",
            "internal": False,
            "power_state": "Running",
        }
    return SystemInfo.from_json({"domains": domains})


INFO = _system_info()
POLICY = _load(ours=True)


def evaluate(source: str, target: str, service: str) -> str:
    name, _, arg = service.partition("+")
    try:
        res = POLICY.evaluate(
            service=name, argument="+" + arg, source=source, target=target, system_info=INFO
        )
    except AccessDenied:
        return "deny"
    if isinstance(res, AllowResolution):
        return f"allow:{res.target}"
    return "ask"


def test_the_stock_policy_is_really_loaded() -> None:
    # without our file, a normal qube may open a shell in a disposable: the hole we close
    stock = _load(ours=False)
    res = stock.evaluate(
        service="qubes.VMShell", argument="+", source="ai-dev", target="@dispvm", system_info=INFO
    )
    assert isinstance(res, AllowResolution)


SANDBOX = [
    "ai-notes",
    "ai-dev",
    "ai-web",
    "ai-build",
    "ai-dvm",
    "ai-debian",
    "ai-egress",
    "ai-dump",
    "ai-hybrid",
]
ESCAPES = [
    "qubes.VMShell",
    "qubes.VMExec+ls",
    "qubes.VMExecGUI",
    "qubes.OpenInVM",
    "qubes.OpenURL",
    "qubes.StartApp+xterm",
    "qubes.GetImageRGBA",
    "qubes.Filecopy",
    "qubes.ClipboardPaste",
    "qubes.ConnectTCP+22",
    "admin.vm.List",
    "admin.vm.property.Get+netvm",
    "admin.vm.CreateDisposable",
    "qmcp.Run",
    "qmcp.List",
    "policy.RegisterArgument+x",
    "qubes.UpdatesProxy",
]
OUTSIDE = [
    "@dispvm",
    "@dispvm:default-dvm",
    "personal",
    "vault",
    "sys-net",
    "dom0",
    "@adminvm",
    "no-such-qube",
    "mcp-control",
    "@default",
]


@pytest.mark.parametrize("target", OUTSIDE)
@pytest.mark.parametrize("service", ESCAPES)
@pytest.mark.parametrize("source", SANDBOX)
def test_a_sandbox_qube_cannot_leave_the_sandbox(source: str, service: str, target: str) -> None:
    result = evaluate(source, target, service)
    redirectable = target not in ("dom0", "@adminvm")
    if service == "qubes.UpdatesProxy" and redirectable and source != "ai-dump":
        assert result == "allow:ai-egress"  # updates only ever through the operator's egress
    else:
        assert result == "deny", f"{source} -> {target} {service}: {result}"


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("ai-dev", "ai-build", "allow:ai-build"),
        ("ai-web", "ai-dev", "allow:ai-dev"),
        ("ai-dev", "ai-dump", "allow:ai-dump"),
        ("ai-notes", "ai-dev", "deny"),
        ("ai-dev", "ai-notes", "deny"),
        ("ai-dump", "ai-dev", "deny"),
        ("ai-dev", "ai-egress", "deny"),
    ],
    ids=[
        "exec-to-full",
        "net-to-exec",
        "exec-into-dump",
        "read-tier-cannot-push",
        "cannot-push-into-read-tier",
        "dump-is-copy-in-only",
        "egress-has-no-exec-tag",
    ],
)
def test_copies_follow_the_tiers(source: str, target: str, expected: str) -> None:
    assert evaluate(source, target, "qubes.Filecopy") == expected


@pytest.mark.parametrize(
    "service", ["qubes.FeaturesRequest", "qubes.NotifyTools", "qubes.GetDate", "qubes.SyncAppMenus"]
)
def test_sandbox_qubes_keep_their_housekeeping(service: str) -> None:
    assert evaluate("ai-dev", "dom0", service) == "allow:dom0"


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.service)
def test_the_principal_reaches_each_gate_service_only_in_scope(op: object) -> None:
    service = op.service  # type: ignore[attr-defined]
    global_op = op.target.value == "@adminvm"  # type: ignore[attr-defined]
    if global_op:
        assert evaluate("mcp-control", "@adminvm", service) == "allow:dom0"
        assert evaluate("mcp-control", "ai-dev", service) == "deny"
    else:
        assert evaluate("mcp-control", "ai-dev", service) == "allow:dom0"
        for hidden in ("vault", "no-such-qube", "sys-net", "ai-dump", "@dispvm", "dom0"):
            assert evaluate("mcp-control", hidden, service) == "deny", hidden


@pytest.mark.parametrize(
    "target", ["ai-dev", "@adminvm", "dom0", "@dispvm", "personal", "@default"]
)
@pytest.mark.parametrize(
    "service",
    [
        "admin.vm.List",
        "admin.vm.tag.Set+ai-full",
        "admin.vm.property.Set+netvm",
        "admin.Events",
        "qubes.VMShell",
        "qubes.Filecopy",
        "qubes.OpenInVM",
        "policy.Replace+x",
        "admin.vm.Create.AppVM",
    ],
)
def test_the_principal_has_no_path_around_the_gate(service: str, target: str) -> None:
    assert evaluate("mcp-control", target, service) == "deny"


def test_a_read_ceiling_principal_cannot_even_reach_write_services() -> None:
    assert evaluate("auditor", "ai-dev", "qmcp.Info") == "allow:dom0"
    for service in ("qmcp.Run", "qmcp.Start", "qmcp.Remove", "qmcp.Create"):
        assert evaluate("auditor", "ai-dev", service) == "deny"


ALL_SERVICES = [*ESCAPES, "qubes.GetDate", *(op.service for op in OPERATIONS)]


@pytest.mark.parametrize("service", ALL_SERVICES)
@pytest.mark.parametrize("source", [*SANDBOX, "mcp-control", "auditor"])
@pytest.mark.parametrize("existing", ["vault", "sys-net", "work", "debian-13-xfce"])
def test_no_policy_answer_tells_an_existing_name_from_a_made_up_one(
    source: str, service: str, existing: str
) -> None:
    assert evaluate(source, existing, service) == evaluate(source, "made-up-name", service)
