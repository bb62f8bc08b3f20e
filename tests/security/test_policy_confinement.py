"""The generated policy, loaded together with the emulator's stock-like R4.3 defaults, keeps
principals and sandbox qubes inside the lines DESIGN.md section 5 draws.

Each case is an attack a hostile agent (root in the control qube) or a hostile sandbox qube
(root inside it, calling qrexec itself) would try; the stock policy allows several of them.
Enrolment is by name (decision record 0010): the fleet below also holds qubes the *operator*
made by ordinary Qubes means from enrolled ones -- a disposable of the scope's disposable
template and a clone, which carry the scope's tags as R4.3 copies them -- and the policy must
grant them nothing.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid as uuidlib
from pathlib import Path

import pytest

from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.dom0.render import POLICY_NAME, validated_policy
from qubes_mcp.policy import AccessDenied, AllowResolution, Policy, SystemInfo
from tests.enrolment_helpers import registry_for, uuid_of
from tests.gate_fixtures import config, demo_qubes, qube

STOCK = Path(__file__).resolve().parents[2] / "src" / "qubes_mcp" / "sim" / "data" / "policy.d"

#: qubes the gate itself created (registered by the gate at birth)
GATE_BORN = [qube("disp-ai-1", "ai-managed", "ai-exec", "ai-owner-mcp-control", klass="DispVM")]
#: the operator's own qubes, made from enrolled ones: tags copied, never registered
OPERATORS = [
    qube("disp9001", "ai-managed", "ai-exec", klass="DispVM", registered=None),
    qube("ai-dev-clone", "ai-managed", "ai-exec", registered=None),
    qube("work2", "ai-managed", "ai-full", registered=None),  # qvm-create from ai-fulltpl + tags
]
FLEET = [*demo_qubes(), *GATE_BORN, *OPERATORS]
REGISTRY = registry_for(FLEET)
_TMP = tempfile.TemporaryDirectory(prefix="qmcp-policy-")


def _load(*, ours: bool) -> Policy:
    """The stock directory (with its include/ files), plus our generated file."""
    root = Path(_TMP.name) / ("with-ours" if ours else "stock")
    if not root.exists():
        shutil.copytree(STOCK, root)
        if ours:
            (root / POLICY_NAME).write_text(validated_policy(config(), REGISTRY))
    return Policy.load([root])


def _system_info() -> SystemInfo:
    domains = {}
    extra = {
        "personal": ("AppVM", []),
        "default-dvm": ("AppVM", []),
        "secret-dvm": ("AppVM", []),  # a hidden disposable template
        "mcp-control": ("AppVM", []),
        "auditor": ("AppVM", []),
        "sys-net": ("AppVM", []),
    }
    for q in FLEET:
        domains[q.name] = {
            "type": q.klass,
            "tags": sorted(q.tags),
            "template_for_dispvms": q.flag("template_for_dispvms"),
            "default_dispvm": "default-dvm",
            "internal": False,
            "power_state": "Running",
            "uuid": uuid_of(q.name),
        }
    for name, (klass, tags) in extra.items():
        domains[name] = {
            "type": klass,
            "tags": tags,
            "default_dispvm": "default-dvm",
            "template_for_dispvms": name.endswith("-dvm"),
            "internal": False,
            "power_state": "Running",
            "uuid": uuid_of(name),
        }
    return SystemInfo.from_json({"domains": domains})


INFO = _system_info()
POLICY = _load(ours=True)
STOCK_POLICY = _load(ours=False)


def evaluate(source: str, target: str, service: str, policy: Policy = POLICY) -> str:
    name, _, arg = service.partition("+")
    try:
        res = policy.evaluate(
            service=name, argument="+" + arg, source=source, target=target, system_info=INFO
        )
    except AccessDenied:
        return "deny"
    if isinstance(res, AllowResolution):
        return f"allow:{res.target}"
    return "ask"


def test_the_stock_policy_is_really_loaded() -> None:
    # without our file, a normal qube may open a shell in a disposable: the hole we close
    assert evaluate("ai-dev", "@dispvm", "qubes.VMShell", STOCK_POLICY).startswith("allow:")


#: registered sandbox qubes of every kind: app qubes of each tier, the disposable template,
#: templates, the egress qube, the dump sink, a disposable the gate created
SANDBOX = [
    "ai-notes",
    "ai-dev",
    "ai-web",
    "ai-build",
    "ai-dvm",
    "ai-debian",
    "ai-fulltpl",
    "ai-egress",
    "ai-dump",
    "disp-ai-1",
]
TEMPLATES = {"ai-debian", "ai-fulltpl"}
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
    "qubes.SyncAppMenus",
]
OUTSIDE = [
    "@dispvm",
    "@dispvm:default-dvm",
    "@dispvm:secret-dvm",
    "@dispvm:ai-dvm",
    "personal",
    "vault",
    "sys-net",
    "dom0",
    "@adminvm",
    "no-such-qube",
    "mcp-control",
    "@default",
    "ai-dev",
    "disp9001",
]


def _redirectable(target: str) -> bool:
    """A target the oracle-free "any non-dom0 qube" set matches: a concrete non-dom0 name
    (existing or not) or @default -- never dom0, never an @dispvm form."""
    return target not in ("dom0", "@adminvm") and not target.startswith("@dispvm")


@pytest.mark.parametrize("target", OUTSIDE)
@pytest.mark.parametrize("service", ESCAPES)
@pytest.mark.parametrize("source", SANDBOX)
def test_a_sandbox_qube_cannot_leave_the_sandbox(source: str, service: str, target: str) -> None:
    result = evaluate(source, target, service)
    if service == "qubes.UpdatesProxy" and source in TEMPLATES and _redirectable(target):
        assert result == "allow:ai-egress"  # templates' updates only through the egress qube
    elif service == "qubes.SyncAppMenus" and source in TEMPLATES and target in ("dom0", "@adminvm"):
        assert result == "allow:dom0"  # stock R4.3: menus from templates only
    else:
        assert result == "deny", f"{source} -> {target} {service}: {result}"


@pytest.mark.parametrize("target", SANDBOX)
@pytest.mark.parametrize("source", SANDBOX)
def test_no_sandbox_qube_can_copy_into_another(source: str, target: str) -> None:
    # copies are relayed by dom0 (the gate moves the bytes); no Filecopy path exists at all
    assert evaluate(source, target, "qubes.Filecopy") == "deny"


@pytest.mark.parametrize(
    "service",
    ["qubes.FeaturesRequest", "qubes.NotifyTools", "qubes.NotifyUpdates", "qubes.GetDate"],
)
@pytest.mark.parametrize("source", SANDBOX)
def test_sandbox_qubes_keep_their_housekeeping(source: str, service: str) -> None:
    assert evaluate(source, "dom0", service) == "allow:dom0"


@pytest.mark.parametrize("source", SANDBOX)
def test_the_clock_sync_asks_for_default_and_reaches_dom0(source: str) -> None:
    # qvm-sync-clock runs `qrexec-client-vm @default qubes.GetDate+nanoseconds`
    assert evaluate(source, "@default", "qubes.GetDate+nanoseconds") == "allow:dom0"


@pytest.mark.parametrize("source", sorted(set(SANDBOX) - TEMPLATES))
def test_only_templates_may_touch_dom0_menus_or_the_updates_proxy(source: str) -> None:
    assert evaluate(source, "dom0", "qubes.SyncAppMenus") == "deny"
    assert evaluate(source, "@default", "qubes.UpdatesProxy") == "deny"


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.service)
def test_the_principal_reaches_each_gate_service_only_on_registered_names(op: object) -> None:
    service = op.service  # type: ignore[attr-defined]
    global_op = op.target.value == "@adminvm"  # type: ignore[attr-defined]
    if global_op:
        assert evaluate("mcp-control", "@adminvm", service) == "allow:dom0"
        assert evaluate("mcp-control", "ai-dev", service) == "deny"
    else:
        assert evaluate("mcp-control", "ai-dev", service) == "allow:dom0"
        assert evaluate("mcp-control", "disp-ai-1", service) == "allow:dom0"
        hidden = ("vault", "no-such-qube", "sys-net", "ai-dump", "@dispvm", "dom0", "ai-hybrid")
        for name in (*hidden, *(q.name for q in OPERATORS)):
            assert evaluate("mcp-control", name, service) == "deny", name


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
        "qubes.UpdatesProxy",
        "qubes.SyncAppMenus",
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
@pytest.mark.parametrize("source", [q.name for q in OPERATORS])
def test_the_operators_own_tagged_qubes_get_nothing_from_our_policy(
    source: str, service: str
) -> None:
    """An operator's disposable or clone carries the scope's tags, but our file has no line for
    it: every answer is exactly the stock policy's (its own qubes, its own rules)."""
    for target in [*OUTSIDE, *SANDBOX]:
        assert evaluate(source, target, service) == evaluate(
            source, target, service, STOCK_POLICY
        ), target


_RANDOM_UUID = str(uuidlib.UUID(int=0x1234_5678_9ABC_4DEF_8123_456789ABCDEF))
#: (hidden existing form, missing form): every target form qrexec accepts, for qubes the caller
#: cannot see (plain app qubes, a hidden disposable template, the operator's tagged qubes)
PAIRS = [
    ("vault", "made-up-name"),
    ("work", "made-up-name"),
    ("secret-dvm", "made-up-name"),
    ("disp9001", "made-up-name"),
    ("ai-dev-clone", "made-up-name"),
    ("debian-13-xfce", "made-up-name"),
    ("ai-hybrid", "made-up-name"),
    ("@default", "made-up-name"),
    ("@dispvm:secret-dvm", "@dispvm:no-such-dvm"),
    ("@dispvm:default-dvm", "@dispvm:no-such-dvm"),
    ("@dispvm:ai-dvm", "@dispvm:no-such-dvm"),
    ("@dispvm:vault", "@dispvm:no-such-dvm"),
    (f"@dispvm:uuid:{uuid_of('secret-dvm')}", f"@dispvm:uuid:{_RANDOM_UUID}"),
    ("@dispvm:@tag:ai-managed", "@dispvm:@tag:no-such-tag"),
    (f"uuid:{uuid_of('vault')}", f"uuid:{_RANDOM_UUID}"),
    (f"uuid:{uuid_of('secret-dvm')}", f"uuid:{_RANDOM_UUID}"),
    (f"uuid:{uuid_of('disp9001')}", f"uuid:{_RANDOM_UUID}"),
    ("Vault", "made-up-name"),
    ("SECRET-DVM", "made-up-name"),
    ("@dispvm:Secret-dvm", "@dispvm:no-such-dvm"),
    ("@DISPVM:secret-dvm", "@DISPVM:no-such-dvm"),
    ("@Dispvm", "@DISPVM"),
]
MATRIX_SOURCES = ["mcp-control", "auditor", *SANDBOX]


@pytest.mark.parametrize("service", ALL_SERVICES)
@pytest.mark.parametrize("source", MATRIX_SOURCES)
def test_no_policy_answer_tells_a_hidden_qube_from_a_missing_one(source: str, service: str) -> None:
    for hidden, missing in PAIRS:
        assert evaluate(source, hidden, service) == evaluate(source, missing, service), (
            f"{source} {service}: {hidden} vs {missing}"
        )


@pytest.mark.parametrize("service", ALL_SERVICES)
@pytest.mark.parametrize("source", MATRIX_SOURCES)
def test_no_caller_reaches_a_disposable(source: str, service: str) -> None:
    for target in ("@dispvm", "@dispvm:default-dvm", "@dispvm:ai-dvm", "@dispvm:secret-dvm"):
        assert evaluate(source, target, service) == "deny", target
