"""The stock-like default policy loads with our engine and means what R4.3's stock files mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.policy import AccessDenied, AllowResolution, AskResolution, Policy, SystemInfo
from qubes_mcp.sim.qrexec.default_policy import DEFAULT_POLICY_DIR


def dom(klass: str = "AppVM", tags: tuple[str, ...] = (), dvm: bool = False) -> dict[str, Any]:
    return {
        "tags": list(tags),
        "type": klass,
        "template_for_dispvms": dvm,
        "default_dispvm": "default-dvm",
        "internal": False,
        "power_state": "Halted",
        "uuid": None,
        "icon": "",
        "label": "red",
        "guivm": None,
        "relayvm": None,
        "transport_rpc": None,
    }


INFO = SystemInfo.from_json(
    {
        "domains": {
            "dom0": dom("AdminVM"),
            "work": dom(),
            "vault": dom(),
            "sys-net": dom(),
            "default-dvm": dom(dvm=True),
            "debian": dom("TemplateVM"),
            "restorer": dom(tags=("backup-restore-mgmt",)),
        }
    }
)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load([DEFAULT_POLICY_DIR])


def decide(policy: Policy, source: str, target: str, service: str, arg: str = "+") -> str:
    try:
        res = policy.evaluate(
            service=service, argument=arg, source=source, target=target, system_info=INFO
        )
    except AccessDenied:
        return "deny"
    if isinstance(res, AskResolution):
        return "ask"
    assert isinstance(res, AllowResolution)
    return f"allow:{res.target}"


@pytest.mark.parametrize(
    ("source", "target", "service", "want"),
    [
        pytest.param(
            "work",
            "@dispvm",
            "qubes.VMShell",
            "allow:@dispvm:default-dvm",
            id="shell-in-new-disposable-allowed",
        ),
        pytest.param("work", "vault", "qubes.VMShell", "deny", id="shell-in-other-qube-denied"),
        pytest.param("work", "vault", "qubes.VMExec", "deny", id="exec-in-other-qube-denied"),
        pytest.param("work", "vault", "qubes.VMRootShell", "deny", id="root-shell-denied"),
        pytest.param("work", "vault", "qubes.Filecopy", "ask", id="filecopy-asks"),
        pytest.param("work", "@default", "qubes.Filecopy", "ask", id="qvm-copy-asks"),
        pytest.param("work", "vault", "qubes.OpenInVM", "ask", id="open-in-other-qube-asks"),
        pytest.param("work", "vault", "qubes.GetDate", "allow:dom0", id="date-from-dom0"),
        pytest.param("work", "dom0", "qubes.FeaturesRequest", "allow:dom0", id="features-request"),
        pytest.param(
            "debian",
            "@default",
            "qubes.UpdatesProxy",
            "allow:sys-net",
            id="template-updates-through-sys-net",
        ),
        pytest.param(
            "work", "@default", "qubes.UpdatesProxy", "deny", id="appvm-has-no-update-proxy"
        ),
        pytest.param("work", "dom0", "admin.vm.List", "deny", id="admin-api-closed-by-default"),
        pytest.param("work", "vault", "admin.vm.property.GetAll", "deny", id="getall-denied"),
        pytest.param(
            "restorer", "dom0", "admin.vm.List", "allow:dom0", id="backup-restore-may-list"
        ),
        pytest.param("work", "vault", "qubes.ConnectTCP", "deny", id="tcp-tunnel-denied"),
        pytest.param("work", "vault", "no.Such", "deny", id="unknown-service-denied"),
    ],
)
def test_stock_meaning(policy: Policy, source: str, target: str, service: str, want: str) -> None:
    assert decide(policy, source, target, service) == want


def test_every_stock_file_has_a_header_saying_what_it_mirrors() -> None:
    for path in sorted(Path(DEFAULT_POLICY_DIR).glob("*.policy")):
        head = path.read_text().splitlines()[0]
        assert head.startswith("#") and "Emulator" in head, path.name
