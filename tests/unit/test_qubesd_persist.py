"""Persistence: every write is saved atomically and a restart keeps everything but power."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qubes_mcp.sim.fleet import FleetError, load_fleet, open_app
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import QubesApp
from qubes_mcp.sim.qubesd.persist import StateFileError
from tests.qubesd_fixtures import Qubesd, demo_app, demo_fixture, ok  # noqa: F401 - fixture


def test_round_trip_keeps_state_and_reboots(tmp_path: Path) -> None:
    first = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        writes = [
            ("work", "admin.vm.property.Set", "vcpus", b"3"),
            ("work", "admin.vm.tag.Set", "project-x", b""),
            ("work", "admin.vm.feature.Set", "service.cups", b"1"),
            ("work", "admin.vm.notes.Set", "", b"remember\n"),
            ("work", "admin.vm.firewall.Set", "", b"action=accept dsthost=10.0.0.1\naction=drop\n"),
            ("work", "admin.vm.volume.Resize", "private", b"4294967296"),
            ("dom0", "admin.property.Set", "default_netvm", b"ai-egress"),
            ("dom0", "admin.vm.Create.AppVM", "", b"name=fresh label=green"),
            ("work", "admin.vm.Start", "", b""),
        ]
        for dest, method, arg, payload in writes:
            assert first.call(dest, method, arg, payload) == ok()
        before = [first.call(d, m, a) for d, m, a in READS]
        listing = first.call("dom0", "admin.vm.List")
    finally:
        first.stop()
    again = Qubesd(QubesApp.load(first.paths)).start()
    try:
        assert [again.call(d, m, a) for d, m, a in READS] == before
        rebooted = listing.replace(
            b"work class=AppVM state=Running", b"work class=AppVM state=Halted"
        )
        rebooted = rebooted.replace(
            b"sys-net class=AppVM state=Running", b"sys-net class=AppVM state=Halted"
        )
        rebooted = rebooted.replace(
            b"sys-firewall class=AppVM state=Running", b"sys-firewall class=AppVM state=Halted"
        )
        rebooted = rebooted.replace(
            b"ai-egress class=AppVM state=Running", b"ai-egress class=AppVM state=Halted"
        )
        assert again.call("dom0", "admin.vm.List") == rebooted
    finally:
        again.stop()


READS = [
    ("work", "admin.vm.tag.List", ""),
    ("work", "admin.vm.feature.List", ""),
    ("work", "admin.vm.property.Get", "vcpus"),
    ("work", "admin.vm.notes.Get", ""),
    ("work", "admin.vm.firewall.Get", ""),
    ("work", "admin.vm.volume.Info", "private"),
    ("fresh", "admin.vm.property.GetAll", ""),
    ("dom0", "admin.property.GetAll", ""),
]


def test_save_is_atomic_and_valid_json(tmp_path: Path) -> None:
    app = load_fleet(None, SimPaths(tmp_path))
    app.save()
    state = SimPaths(tmp_path).state_file
    data = json.loads(state.read_text())
    assert data["version"] == 1
    assert not [p for p in state.parent.iterdir() if p.name.startswith(".qubes.")]


def test_corrupt_state_file_is_refused(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    paths.state_file.parent.mkdir(parents=True)
    paths.state_file.write_text("{not json")
    with pytest.raises(StateFileError):
        QubesApp.load(paths)


def test_open_app_prefers_state_over_fleet(tmp_path: Path) -> None:
    paths = SimPaths(tmp_path)
    app = open_app(paths, None)
    app.domains["work"].notes = "kept"
    app.save()
    assert open_app(paths, None).domains["work"].notes == "kept"


def test_private_dirs_exist_copy_and_vanish(demo: Qubesd) -> None:
    private = demo.paths.private_dir("work")
    assert private.is_dir()
    (private / "home.txt").write_text("data")
    assert demo.call("dom0", "admin.vm.Create.AppVM", "", b"name=copy label=blue") == ok()
    token = demo.call("work", "admin.vm.volume.CloneFrom", "private")[2:]
    assert len(token) == 32
    assert demo.call("copy", "admin.vm.volume.CloneTo", "private", token) == ok()
    assert (demo.paths.private_dir("copy") / "home.txt").read_text() == "data"
    assert demo.call("copy", "admin.vm.volume.CloneTo", "private", token) == b""  # one-time
    assert demo.call("copy", "admin.vm.Remove") == ok()
    assert not demo.paths.qube_dir("copy").exists()


FLEET_ERRORS = {
    "unknown qube key": '[[qube]]\nname = "a"\nclass = "AppVM"\nlabel = "red"\ncolour = 1\n',
    "netvm without network": (
        '[[qube]]\nname = "t"\nclass = "TemplateVM"\nlabel = "red"\n'
        '[[qube]]\nname = "a"\nclass = "AppVM"\nlabel = "red"\ntemplate = "t"\n'
        '[[qube]]\nname = "b"\nclass = "AppVM"\nlabel = "red"\ntemplate = "t"\n'
        'properties = { netvm = "a" }\n'
    ),
    "bad name": '[[qube]]\nname = "0day"\nclass = "TemplateVM"\nlabel = "red"\n',
    "unknown class": '[[qube]]\nname = "x"\nclass = "RemoteVM"\nlabel = "red"\n',
    "template defined later": (
        '[[qube]]\nname = "a"\nclass = "AppVM"\nlabel = "red"\ntemplate = "t"\n'
    ),
    "not toml": "[[qube]\n",
}


@pytest.mark.parametrize("text", list(FLEET_ERRORS.values()), ids=list(FLEET_ERRORS))
def test_bad_fleets_are_refused(tmp_path: Path, text: str) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(text)
    with pytest.raises(FleetError):
        load_fleet(fleet)


def test_demo_fleet_shape() -> None:
    app = load_fleet(None)
    assert app.get("default_netvm").name == "sys-firewall"
    assert app.get("default_dispvm").name == "default-dvm"
    assert app.get("clockvm").name == "sys-net"
    tiers = {
        vm.name: sorted(t for t in vm.tags if t.startswith("ai-")) for vm in app.domains.values()
    }
    assert tiers["ai-dev"] == ["ai-exec", "ai-managed"]
    assert tiers["ai-dump"] == ["ai-dump"]
    assert tiers["mcp-control"] == []
    assert app.domains["ai-dev"].get("netvm").name == "ai-egress"
    assert app.domains["ai-dvm"].get("template_for_dispvms") is True
    assert app.domains["sys-net"].get("autostart") is True
    assert app.devices.to_json()["exposed"]["sys-usb"][0]["port_id"] == "sda"


def test_device_assignment_survives_restart_and_required_device_gates_start(
    tmp_path: Path,
) -> None:
    first = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        assert (
            first.call("work", "admin.vm.device.block.Assign", "sys-usb+sda", b"mode='required'")
            == ok()
        )
        assigned = first.call("work", "admin.vm.device.block.Assigned")
        assert b"sys-usb+sda" in assigned
        # sys-usb is halted, so the required device is not available: start fails, no change
        reply = first.call("work", "admin.vm.Start")
        assert reply.startswith(b"2\0QubesException\0")
        assert b"power_state=Halted" in first.call("work", "admin.vm.CurrentState")
        # a backend whose devices are assigned elsewhere cannot be removed
        assert first.call("sys-usb", "admin.vm.Remove") == (
            b"2\0QubesVMInUseError\0\0VM has devices assigned to other VMs: sda\0"
        )
    finally:
        first.stop()
    again = Qubesd(QubesApp.load(first.paths)).start()
    try:
        assert again.call("work", "admin.vm.device.block.Assigned") == assigned
    finally:
        again.stop()


@pytest.mark.parametrize(
    "name", ["../../etc", "a/b", "", "0bad"], ids=["path traversal", "slash", "empty", "digit"]
)
def test_state_file_with_hostile_qube_name_is_refused(tmp_path: Path, name: str) -> None:
    app = load_fleet(None, SimPaths(tmp_path))
    app.save()
    data = json.loads(app.paths.state_file.read_text())
    data["domains"][1]["props"]["name"] = name
    app.paths.state_file.write_text(json.dumps(data))
    with pytest.raises(StateFileError):
        QubesApp.load(app.paths)
