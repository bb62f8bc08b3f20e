"""Block devices: Available/Attached listings, Attach/Detach rules and qube life cycle (R4.3)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubes_mcp.sim import exc
from qubes_mcp.sim.devices import BlockDevices, BlockDeviceSpec, LibvirtError


class Qubes:
    """A fleet's running/existing qubes, as the emulated qubesd would report them."""

    def __init__(self, running: set[str], halted: set[str]) -> None:
        self.running = set(running)
        self.halted = set(halted)

    def exists(self, name: str) -> bool:
        return name in self.running or name in self.halted

    def is_running(self, name: str) -> bool:
        return name in self.running


def make() -> tuple[BlockDevices, Qubes]:
    qubes = Qubes({"dom0", "sys-usb", "sys-net", "work", "personal"}, {"vault", "sys-off"})
    devs = BlockDevices(qubes)
    devs.expose("sys-usb", BlockDeviceSpec("sda", serial="Kingston", name="DataStick", size=8))
    devs.expose("sys-usb", BlockDeviceSpec("sda1", parent="sda", mode="r"))
    devs.expose("sys-net", BlockDeviceSpec("sda", serial="Other"))
    devs.expose("sys-off", BlockDeviceSpec("sdb"))
    return devs, qubes


SDA = "sys-usb+sda++None"
SDA1 = "sys-usb+sda1++None+1"
# What qubesadmin sends for `vm.devices["block"].attach(DeviceAssignment(dev))`.
CLIENT_PAYLOAD = (
    b"device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' "
    b"mode='manual' frontend_domain='work'"
)


def test_available_lists_a_running_backend_sorted_with_qubesd_keys() -> None:
    devs, _ = make()
    # Sorted by the "<port>:<device id>" key as strings, so "sda1:" comes before "sda:".
    assert devs.available("sys-usb") == (
        "sda1::None:1 device_id=':None:1' port_id='sda1' devclass='block' "
        "backend_domain='sys-usb' manufacturer='sub-device of sys-usb:sda' "
        "interfaces='b******' parent_port_id='sda' parent_devclass='block'\n"
        "sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' "
        "manufacturer='hosted by sys-usb' name='DataStick' serial='Kingston' "
        "interfaces='b******'\n"
    )


def test_available_filters_by_port_and_hides_halted_backends() -> None:
    devs, _ = make()
    assert devs.available("sys-usb", "sda1").startswith("sda1::None:1 ")
    assert devs.available("sys-usb", "sdz") == ""
    assert devs.available("sys-off") == ""
    assert devs.available("work") == ""


def test_attach_as_qubesadmin_does_fires_events_and_lists_the_attachment() -> None:
    devs, _ = make()
    events = devs.attach("work", SDA, CLIENT_PAYLOAD)
    options = "{'read-only': 'no', 'frontend-dev': 'xvdi'}"
    assert events == [
        ("work", "device-pre-attach:block", {"device": "sys-usb:sda::None", "options": options}),
        ("work", "device-attach:block", {"device": "sys-usb:sda::None", "options": options}),
    ]
    assert devs.attached("work") == (
        "sys-usb+sda::None device_id=':None' port_id='sda' devclass='block' "
        "backend_domain='sys-usb' mode='manual' frontend_domain='work' "
        "_read-only='no' _frontend-dev='xvdi'\n"
    )
    assert "attachment='work'" in devs.available("sys-usb", "sda")
    assert devs.attached("personal") == ""


def test_attach_defaults_read_only_devices_and_next_free_frontend_node() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    events = devs.attach("work", SDA1, b"_devtype='cdrom'")
    assert events[1][2]["options"] == (
        "{'devtype': 'cdrom', 'read-only': 'yes', 'frontend-dev': 'xvdj'}"
    )


def test_attach_with_options_normalises_booleans_like_qubesd() -> None:
    devs, _ = make()
    devs.attach("work", "sys-usb+sda+_", b"_read-only='True' _frontend-dev='xvdq'")
    assert devs.attached("work", "sys-usb+sda").endswith("_read-only='yes' _frontend-dev='xvdq'\n")


def test_attach_to_a_paused_frontend_is_allowed() -> None:
    devs, _ = make()  # paused counts as running for qubesd (libvirt domain active)
    devs.attach("personal", SDA, b"")
    assert devs.attached("personal").startswith("sys-usb+sda::None ")


ATTACH_ERRORS: dict[str, tuple[str, str, bytes, type[BaseException]]] = {
    "frontend-halted": ("vault", SDA, b"", exc.QubesVMNotRunningError),
    "backend-halted": ("work", "sys-off+sdb++None", b"", exc.ProtocolError),
    "no-such-port": ("work", "sys-usb+sdz", b"", exc.ProtocolError),
    "no-such-backend-qube": ("work", "nosuch+sda", b"", KeyError),
    "arg-without-plus": ("work", "sys-usb", b"", ValueError),
    "any-backend": ("work", "_+sda+_", b"", exc.ProtocolError),
    "any-port-ambiguous": ("work", "sys-usb+_", b"", exc.ProtocolError),
    "device-id-mismatch-in-arg": ("work", "sys-usb+sda++1", b"", exc.ProtocolError),
    "payload-other-backend": ("work", SDA, b"backend_domain='sys-net'", exc.ProtocolError),
    "payload-other-port": ("work", SDA, b"port_id='sda1'", exc.ProtocolError),
    "payload-other-devclass": ("work", SDA, b"devclass='usb'", exc.ProtocolError),
    "payload-other-device-id": ("work", SDA, b"device_id=':1'", exc.ProtocolError),
    "payload-unknown-key": ("work", SDA, b"vendor='evil'", exc.ProtocolError),
    "payload-bad-mode": ("work", SDA, b"mode='always'", exc.ProtocolError),
    "payload-unknown-frontend": ("work", SDA, b"frontend_domain='nosuch'", exc.ProtocolError),
    "payload-non-ascii": ("work", SDA, "_x='é'".encode(), exc.ProtocolError),
    "payload-bad-key-chars": ("work", SDA, b"a b='1'", exc.ProtocolError),
    "option-unsupported": ("work", SDA, b"_no-such-option='123'", exc.QubesValueError),
    "option-read-only-maybe": ("work", SDA, b"_read-only='maybe'", exc.QubesValueError),
    "read-write-of-read-only-device": ("work", SDA1, b"_read-only='no'", exc.QubesValueError),
    "frontend-dev-not-xvd": ("work", SDA, b"_frontend-dev='hda'", exc.QubesValueError),
    "devtype-floppy": ("work", SDA, b"_devtype='floppy'", exc.QubesValueError),
    "frontend-dev-system-disk": ("work", SDA, b"_frontend-dev='xvda'", LibvirtError),
    "frontend-dev-garbage": ("work", SDA, b"_frontend-dev='xvd\\'x'", LibvirtError),
    "attach-to-own-backend": ("sys-usb", SDA, b"", LibvirtError),
    "attach-to-dom0": ("dom0", SDA, b"", LibvirtError),
}


@pytest.mark.parametrize(
    ("frontend", "arg", "payload", "error"), ATTACH_ERRORS.values(), ids=ATTACH_ERRORS.keys()
)
def test_refused_attach_raises_qubesd_class_and_changes_nothing(
    frontend: str, arg: str, payload: bytes, error: type[BaseException]
) -> None:
    devs, _ = make()
    before = json.dumps(devs.to_json())
    with pytest.raises(error):
        devs.attach(frontend, arg, payload)
    assert json.dumps(devs.to_json()) == before


def test_frontend_not_running_message_is_qubesd_s() -> None:
    devs, _ = make()
    with pytest.raises(exc.QubesVMNotRunningError) as info:
        devs.attach("vault", SDA, b"")
    assert str(info.value) == "VM not running, cannot attach device, do you mean `assign`?"


def test_attaching_twice_to_the_same_qube_is_already_attached() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    with pytest.raises(exc.DeviceAlreadyAttached, match="of class block already attached to work"):
        devs.attach("work", SDA, b"")


def test_attaching_a_device_in_use_elsewhere_is_already_attached() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    with pytest.raises(exc.DeviceAlreadyAttached, match="sys-usb:sda::None already attached to"):
        devs.attach("personal", SDA, b"")
    assert devs.attached("personal") == ""


DENIED = {
    "block-class-denied": ("b******", b"", exc.PermissionDenied),
    "everything-denied": ("*******", b"", exc.PermissionDenied),
    "denied-and-device-not-identified": ("u******", b"", exc.PermissionDenied),
}


@pytest.mark.parametrize(("denied", "payload", "error"), DENIED.values(), ids=DENIED.keys())
def test_devices_denied_blocks_manual_attach(
    denied: str, payload: bytes, error: type[BaseException]
) -> None:
    devs, _ = make()
    arg = "sys-usb+sda+_" if denied == "u******" else SDA
    with pytest.raises(error):
        devs.attach("work", arg, payload, devices_denied=denied)
    assert devs.attached("work") == ""


def test_devices_denied_other_class_allows_identified_block_device() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"", devices_denied="u******p02****")
    assert devs.attached("work") != ""


def test_devices_denied_is_skipped_for_non_manual_mode_as_in_r43() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"mode='auto-attach'", devices_denied="b******")
    assert devs.attached("work") != ""


def test_detach_fires_events_and_frees_the_device() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    assert devs.detach("work", "sys-usb+sda+_") == [
        ("work", "device-pre-detach:block", {"port": "sys-usb:sda"}),
        ("work", "device-detach:block", {"port": "sys-usb:sda"}),
    ]
    assert devs.attached("work") == ""
    assert "attachment=" not in devs.available("sys-usb")


@pytest.mark.parametrize(
    ("frontend", "arg"),
    [("work", "sys-usb+sda"), ("vault", "sys-usb+sda"), ("work", "sys-usb+_")],
    ids=["nothing-attached", "frontend-halted", "any-port"],
)
def test_detach_of_what_is_not_attached_is_device_not_assigned(frontend: str, arg: str) -> None:
    devs, _ = make()
    with pytest.raises(exc.DeviceNotAssigned) as info:
        devs.detach(frontend, arg)
    # DeviceNotAssigned is a KeyError: qubesd sends str(), which quotes the message.
    assert str(
        info.value
    ) == f"'block device {arg.split('+')[1]} not attached to {frontend}'".replace("_", "*")


def test_detach_matches_port_only_like_r43() -> None:
    devs, _ = make()
    devs.attach("work", "sys-net+sda", b"")
    events = devs.detach("work", "sys-usb+sda")
    assert events[1] == ("work", "device-detach:block", {"port": "sys-net:sda"})


def test_detach_with_unknown_backend_qube_is_key_error() -> None:
    devs, _ = make()
    with pytest.raises(KeyError):
        devs.detach("work", "nosuch+sda")


def test_backend_shutdown_removes_devices_and_detaches_frontends() -> None:
    devs, qubes = make()
    devs.attach("work", SDA, b"")
    events = devs.detach_all_of("sys-usb")
    qubes.running.discard("sys-usb")
    assert events == [
        ("sys-usb", "device-removed:block", {"port": "sys-usb:sda"}),
        ("work", "device-pre-detach:block", {"port": "sys-usb:sda"}),
        ("work", "device-detach:block", {"port": "sys-usb:sda"}),
        ("sys-usb", "device-removed:block", {"port": "sys-usb:sda1"}),
    ]
    assert devs.attached("work") == ""
    assert devs.available("sys-usb") == ""


def test_frontend_shutdown_ends_its_attachments_only() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    devs.attach("personal", "sys-net+sda", b"")
    assert devs.detach_all_of("work") == [("work", "device-detach:block", {"port": "sys-usb:sda"})]
    assert devs.attached("personal") != ""


def test_backend_start_announces_its_devices() -> None:
    devs, qubes = make()
    qubes.running.add("sys-off")
    assert devs.qube_started("sys-off") == [
        ("sys-off", "device-list-change:block", {}),
        ("sys-off", "device-added:block", {"device": "sys-off:sdb::None"}),
    ]
    assert devs.qube_started("work") == []


def test_hot_unplug_detaches_first() -> None:
    devs, _ = make()
    devs.attach("work", SDA1, b"")
    events = devs.unexpose("sys-usb", "sda1")
    assert [e[1] for e in events] == [
        "device-list-change:block",
        "device-pre-detach:block",
        "device-detach:block",
        "device-removed:block",
    ]
    assert "sda1" not in devs.available("sys-usb")


def test_forget_drops_a_removed_qube_everywhere() -> None:
    devs, _ = make()
    devs.attach("work", SDA, b"")
    devs.forget("work")
    devs.forget("sys-net")
    assert devs.attached("work") == ""
    assert devs.available("sys-net") == ""
    assert "attachment=" not in devs.available("sys-usb")


def test_state_round_trips_through_json() -> None:
    devs, qubes = make()
    devs.attach("work", SDA, b"_read-only='yes'")
    restored = BlockDevices.from_json(json.loads(json.dumps(devs.to_json())), qubes)
    assert restored.to_json() == devs.to_json()
    assert restored.attached("work") == devs.attached("work")
    assert restored.available("sys-usb") == devs.available("sys-usb")


@pytest.mark.parametrize(
    "spec",
    [
        {"port_id": "../etc"},
        {"port_id": "sda", "mode": "x"},
        {"port_id": "sda", "size": -1},
        {"port_id": "sda", "serial": "it's"},
        {"port_id": "sda", "parent": "a b"},
        {"port_id": "sda", "vendor": "x"},
        {"port_id": "a" * 13},
    ],
    ids=[
        "path-traversal-port",
        "bad-mode",
        "negative-size",
        "quote-in-serial",
        "bad-parent",
        "unknown-key",
        "port-too-long",
    ],
)
def test_fleet_device_spec_is_validated(spec: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BlockDeviceSpec.from_json(spec)


_ALLOWED = (
    exc.QubesException,
    exc.ProtocolError,
    exc.PermissionDenied,
    KeyError,
    ValueError,
    LibvirtError,
)
_ARG = st.one_of(
    st.sampled_from([SDA, SDA1, "sys-usb+sda+_", "sys-usb+_", "_+_", "work+sda", "sys-net+sda"]),
    st.text("sys-ubdan+_:*1?", max_size=16),
)
_PAYLOAD = st.one_of(
    st.sampled_from([b"", CLIENT_PAYLOAD, b"mode='required'", b"_read-only='no'"]),
    st.lists(
        st.sampled_from(
            [b"mode=", b"'manual'", b"_", b"read-only", b"='", b"' ", b"x", b"\\'", b"\xff", b" "]
        ),
        max_size=10,
    ).map(b"".join),
)


@settings(max_examples=200)
@given(st.sampled_from(["work", "vault", "sys-usb", "dom0"]), _ARG, _PAYLOAD)
def test_random_attach_raises_only_qubesd_classes_and_is_atomic(
    frontend: str, arg: str, payload: bytes
) -> None:
    devs, _ = make()
    before = json.dumps(devs.to_json())
    try:
        devs.attach(frontend, arg, payload)
    except _ALLOWED:
        assert json.dumps(devs.to_json()) == before
        return
    assert len(json.loads(json.dumps(devs.to_json()))["attached"]) == 1


# qubesd's own description vectors (qubes/tests/devices_block.py test_000..002), as data.
FLEET_DESCRIPTIONS = {
    "model-and-label": ("Test_ (device)", "Test", "device"),
    "model-only": ("Test_device", "Test device", ""),
    "hostile-bytes": ("Test (device<>za\u0107abc)", "Test", "device  zaabc"),
    "empty": ("", "", ""),
}


@pytest.mark.parametrize(
    ("desc", "serial", "name"), FLEET_DESCRIPTIONS.values(), ids=FLEET_DESCRIPTIONS.keys()
)
def test_fleet_description_is_read_like_qubesdb_desc(desc: str, serial: str, name: str) -> None:
    spec = BlockDeviceSpec.from_fleet({"port": "sda", "description": desc})
    assert (spec.serial, spec.name) == (serial, name)


def test_attachments_of_a_halted_frontend_are_not_live() -> None:
    # As restored from a saved state: the frontend is no longer running.
    devs, qubes = make()
    devs.attach("work", SDA, b"")
    restored = BlockDevices.from_json(json.loads(json.dumps(devs.to_json())), qubes)
    qubes.running.discard("work")
    assert "attachment=" not in restored.available("sys-usb")
    restored.attach("personal", SDA, b"")  # not "already attached"
    events = restored.detach_all_of("sys-usb")
    assert events[1:3] == [
        ("personal", "device-pre-detach:block", {"port": "sys-usb:sda"}),
        ("personal", "device-detach:block", {"port": "sys-usb:sda"}),
    ]
    assert all(subject != "work" for subject, _, _ in events)  # the stale record is silent


def test_a_starting_qube_has_no_attachments() -> None:
    devs, qubes = make()
    devs.attach("work", SDA, b"")
    restored = BlockDevices.from_json(json.loads(json.dumps(devs.to_json())), qubes)
    qubes.running.discard("work")
    qubes.running.add("work")
    assert restored.qube_started("work") == []
    assert restored.attached("work") == ""
