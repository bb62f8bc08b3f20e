"""Egress per principal, end to end on the emulator (issue 10 §4).

Two principals in two scopes: ``mcp-control`` (scope ``ai``) reaches the network through the
top-level default ``ai-egress`` ("clearnet"), ``tor-control`` (scope ``tor``) through its own
``egress_qube = "sys-whonix"`` ("tor"). Each one's new qubes are born on its own egress, the
generated policy sends each scope's templates' updates to its own egress, and neither principal
can point a qube at the other's egress.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import code, dom0_admin, gate_call, ok

TOR_FLEET = """
[[qube]]
name = "tor-control"
class = "AppVM"
label = "gray"

[[qube]]
name = "sys-whonix"
class = "AppVM"
label = "black"
tags = ["tor-managed"]
properties = { provides_network = true, netvm = "sys-firewall" }
features = { "service.qubes-updates-proxy" = "1" }

[[qube]]
name = "tor-debian"
class = "TemplateVM"
label = "black"
tags = ["tor-managed", "tor-exec"]
features = { os = "Linux", qrexec = "1", gui = "1" }
volumes = { root = 21474836480 }

[[qube]]
name = "tor-dev"
class = "AppVM"
label = "purple"
tags = ["tor-managed", "tor-full"]
properties = { netvm = "sys-whonix" }
"""

TOR_PRINCIPAL = """
[[principal]]
qube = "tor-control"
scope = "tor"
ceiling = "full"
name_prefix = "tor-"
may_create = true
egress_qube = "sys-whonix"
"""


def _with_tor_principal(text: str) -> str:
    # the generated config ends with its [[principal]]; a second one must precede [budget]…
    head, sep, tail = text.partition("\n[budget]")
    return head + TOR_PRINCIPAL + sep + tail


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("egress")
    demo = resources.files("qubes_mcp.sim.data.fleets").joinpath("demo.toml").read_text()
    fleet = base / "fleet.toml"
    fleet.write_text(demo + TOR_FLEET)
    s = start_stack(base / "root", fleet=fleet, config_edit=_with_tor_principal)
    try:
        yield s
    finally:
        s.stop()


def _netvm(stack: Stack, name: str) -> str:
    return dom0_admin(stack, name, "admin.vm.property.Get", "netvm").split(" ", 2)[2]


def test_each_principals_new_qubes_are_born_on_its_own_egress(stack: Stack) -> None:
    ok(gate_call(stack, "ai-debian", "qmcp.Create", {"name": "ai-clear1"}))
    ok(gate_call(stack, "tor-debian", "qmcp.Create", {"name": "tor-anon1"}, source="tor-control"))
    assert _netvm(stack, "ai-clear1") == "ai-egress"
    assert _netvm(stack, "tor-anon1") == "sys-whonix"


def test_update_lines_name_each_scopes_template_and_its_own_egress(stack: Stack) -> None:
    policy = (stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy").read_text()
    updates = [ln.split() for ln in policy.splitlines() if ln.startswith("qubes.UpdatesProxy")]
    pairs = {(cols[2], cols[-1]) for cols in updates}
    assert pairs == {("ai-debian", "target=ai-egress"), ("tor-debian", "target=sys-whonix")}


@pytest.mark.parametrize(
    ("source", "qube", "foreign"),
    [("mcp-control", "ai-build", "sys-whonix"), ("tor-control", "tor-dev", "ai-egress")],
    ids=["clearnet-principal-to-tor", "tor-principal-to-clearnet"],
)
def test_neither_principal_can_use_the_others_egress(
    stack: Stack, source: str, qube: str, foreign: str
) -> None:
    before = _netvm(stack, qube)
    set_netvm = {"property": "netvm", "value": foreign}
    # the other egress is outside the caller's scope: the one not-found, as for any hidden qube
    assert code(gate_call(stack, qube, "qmcp.SetProperty", set_netvm, source=source)) == (
        "not-found"
    )
    # the other's egress is not even addressable through qrexec
    assert gate_call(stack, foreign, "qmcp.Info", source=source) == {"refused": 126}
    assert _netvm(stack, qube) == before


def test_a_disconnected_qube_reconnects_only_to_its_principals_egress(stack: Stack) -> None:
    off = {"property": "netvm", "value": None}
    ok(gate_call(stack, "tor-dev", "qmcp.SetProperty", off, source="tor-control"))
    back = {"property": "netvm", "value": "sys-whonix"}
    ok(gate_call(stack, "tor-dev", "qmcp.SetProperty", back, source="tor-control"))
    assert _netvm(stack, "tor-dev") == "sys-whonix"


def test_doctor_checks_each_principals_egress(stack: Stack) -> None:
    assert "error:" not in stack.admin("doctor", "--root", str(stack.root)).stdout
    dom0_admin(stack, "sys-whonix", "admin.vm.feature.Remove", "service.qubes-updates-proxy")
    try:
        out = stack.admin("doctor", "--root", str(stack.root)).stdout
        assert "egress qube sys-whonix of tor-control does not run the updates proxy" in out
        assert not [ln for ln in out.splitlines() if "ai-egress" in ln and "proxy" in ln]
    finally:
        dom0_admin(stack, "sys-whonix", "admin.vm.feature.Set", "service.qubes-updates-proxy", b"1")
