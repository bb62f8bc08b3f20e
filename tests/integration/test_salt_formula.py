"""The Salt formula (packaging/salt/qubes-mcp): it renders, it uses only what the qvm states
offer, and what it says builds the operator guide's layout on the emulator (issue 9 §3).

Salt itself does not run here; the test renders the state file the way Salt does (Jinja with a
``salt['pillar.get']``, then YAML), checks each state against the qvm module's vocabulary, and
applies each state as the Admin API calls ``qvm.*`` makes through qubesadmin in dom0. The
``cmd.run`` states are real ``qubes-mcp-admin`` commands, run against the emulator's root.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import dom0_admin

pytestmark = pytest.mark.bwrap

FORMULA = Path(__file__).resolve().parents[2] / "packaging" / "salt" / "qubes-mcp" / "init.sls"
#: the actions qvm.vm accepts that this formula may use (qubes-mgmt-salt-dom0-qvm ext_state_qvm)
QVM_ACTIONS = {"present", "prefs", "features", "service", "tags", "require"}
#: a fresh Qubes install before the formula: a template and the stock network qubes
FLEET = """
[global]
default_template = "debian-13-xfce"
default_netvm = "sys-firewall"

[[qube]]
name = "debian-13-xfce"
class = "TemplateVM"
label = "black"
features = { os = "Linux", qrexec = "1", gui = "1" }

[[qube]]
name = "sys-net"
class = "AppVM"
label = "red"
properties = { provides_network = true, netvm = "" }

[[qube]]
name = "sys-firewall"
class = "AppVM"
label = "green"
properties = { provides_network = true, netvm = "sys-net" }
"""
PRESENT_KEYS = {"label", "template", "class", "mem", "vcpus", "flags"}


def render(pillar: dict[str, Any] | None = None) -> dict[str, Any]:
    def pillar_get(key: str, default: Any = None) -> Any:
        return (pillar or {}).get(key, default)

    text = jinja2.Template(FORMULA.read_text()).render(salt={"pillar.get": pillar_get})
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _options(items: list[Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for item in items:
        assert isinstance(item, dict) and len(item) == 1, item
        merged.update(item)
    return merged


def test_the_formula_renders_and_uses_only_qvm_vocabulary() -> None:
    states = render()
    qubes = {}
    for sid, body in states.items():
        assert set(body) in ({"qvm.vm"}, {"cmd.run"}), sid
        if "qvm.vm" in body:
            opts = _options(body["qvm.vm"])
            assert set(opts) - {"name"} <= QVM_ACTIONS, sid
            assert set(_options(opts["present"])) <= PRESENT_KEYS
            qubes[opts["name"]] = opts
        else:
            opts = _options(body["cmd.run"])
            argv = shlex.split(opts["name"])
            assert argv[:2] == ["qubes-mcp-admin", "enrol"], sid
            required = {r["qvm"] for r in opts["require"]}
            assert required <= set(states)
    assert set(qubes) == {"mcp-control", "ai-egress", "ai-dvm", "ai-dump"}
    # the layout of the operator guide
    egress = _options(qubes["ai-egress"]["prefs"])
    assert egress["provides-network"] is True
    assert _options(qubes["ai-dvm"]["prefs"])["netvm"] == "ai-egress"
    assert _options(qubes["ai-dvm"]["prefs"])["template-for-dispvms"] is True
    assert _options(qubes["ai-dump"]["prefs"])["netvm"] == "none"


def test_pillar_renames_every_qube() -> None:
    names = {"control": "c1", "egress": "e1", "dvm": "d1", "dump": "x1", "upstream": "sys-whonix"}
    words = set()
    for body in render({"qubes-mcp": names}).values():
        for item in next(iter(body.values())):
            for value in item.values():
                words.update(str(value).replace("'", " ").replace(",", " ").split())
    assert not words & {"mcp-control", "ai-egress", "ai-dvm", "ai-dump", "sys-firewall"}
    assert {"c1", "e1", "d1", "x1", "sys-whonix"} <= words


def _value(v: Any) -> bytes:
    if v is True or v is False:
        return str(v).encode()
    if v in ("none", None):
        return b""
    return str(v).encode()


def apply(stack: Stack, states: dict[str, Any]) -> list[str]:
    """What qubesctl would do in dom0, state by state, in file order."""
    done = []
    for body in states.values():
        if "cmd.run" in body:
            argv = shlex.split(_options(body["cmd.run"])["name"])
            out = stack.admin(*argv[1:])
            assert out.returncode == 0, out.stderr
            done.append(" ".join(argv))
            continue
        opts = _options(body["qvm.vm"])
        name = opts["name"]
        present = _options(opts["present"])
        existing = dom0_admin(stack, "dom0", "admin.vm.List").split("\n")
        if not any(line.startswith(f"{name} ") for line in existing):
            dom0_admin(
                stack,
                "dom0",
                "admin.vm.Create.AppVM",
                "",
                f"name={name} label={present['label']}".encode(),
            )
        for key, value in _options(opts.get("prefs", [])).items():
            dom0_admin(stack, name, "admin.vm.property.Set", key.replace("-", "_"), _value(value))
        for feature in _options(opts.get("features", [])).get("enable", []):
            dom0_admin(stack, name, "admin.vm.feature.Set", feature, b"1")
        for service in _options(opts.get("service", [])).get("enable", []):
            dom0_admin(stack, name, "admin.vm.feature.Set", f"service.{service}", b"1")
        done.append(name)
    return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    fleet = tmp_path_factory.mktemp("fleet") / "fleet.toml"
    fleet.write_text(FLEET)
    s = start_stack(tmp_path_factory.mktemp("salt") / "root", fleet=fleet)
    try:
        yield s
    finally:
        s.stop()


def _prop(stack: Stack, qube: str, prop: str) -> str:
    return dom0_admin(stack, qube, "admin.vm.property.Get", prop).split(" ", 2)[2]


def test_applied_to_the_emulator_it_builds_the_guides_layout(stack: Stack) -> None:
    done = apply(stack, render())
    assert done[:4] == ["mcp-control", "ai-egress", "ai-dvm", "ai-dump"]
    assert _prop(stack, "ai-egress", "provides_network") == "True"
    assert _prop(stack, "ai-egress", "netvm") == "sys-firewall"
    assert (
        dom0_admin(stack, "ai-egress", "admin.vm.feature.Get", "service.qubes-updates-proxy") == "1"
    )
    assert _prop(stack, "ai-dvm", "template_for_dispvms") == "True"
    assert _prop(stack, "ai-dvm", "netvm") == "ai-egress"
    assert _prop(stack, "ai-dump", "netvm") == ""
    # enrolled by qubes-mcp-admin, at the tiers the formula names; the control qube never
    tags = {
        q: set(dom0_admin(stack, q, "admin.vm.tag.List").split())
        for q in ("ai-dvm", "ai-dump", "mcp-control")
    }
    assert {"ai-managed", "ai-exec"} <= tags["ai-dvm"]
    assert "ai-dump" in tags["ai-dump"] and "ai-managed" not in tags["ai-dump"]
    assert not {t for t in tags["mcp-control"] if t.startswith("ai-")}
    # applying it again changes nothing and fails nowhere (Salt states are idempotent)
    assert apply(stack, render()) == done
