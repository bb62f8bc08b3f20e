"""Block device assignments: Assign/Unassign/Set.assignment, auto-attach, required devices."""

from __future__ import annotations

import json

import pytest

from qubes_mcp.sim import exc
from qubes_mcp.sim.devices import BlockDevices, BlockDeviceSpec


class Qubes:
    def __init__(self, running: set[str], halted: set[str]) -> None:
        self.running = set(running)
        self.halted = set(halted)

    def exists(self, name: str) -> bool:
        return name in self.running or name in self.halted

    def is_running(self, name: str) -> bool:
        return name in self.running


def make() -> tuple[BlockDevices, Qubes]:
    qubes = Qubes({"dom0", "sys-usb", "personal"}, {"work", "vault"})
    devs = BlockDevices(qubes)
    devs.expose("sys-usb", BlockDeviceSpec("sda", serial="Kingston"))
    devs.expose("sys-usb", BlockDeviceSpec("sdb", mode="r"))
    return devs, qubes


SDA = "sys-usb+sda++None"
# What qubesadmin sends for DeviceAssignment(dev, mode="auto-attach") on work.
AUTO = (
    b"device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' "
    b"mode='auto-attach' frontend_domain='work'"
)


def start(devs: BlockDevices, qubes: Qubes, name: str) -> list[tuple[str, str, dict[str, str]]]:
    devs.check_start(name)
    qubes.halted.discard(name)
    qubes.running.add(name)
    return devs.qube_started(name)


def test_assign_lists_the_assignment_and_fires_events() -> None:
    devs, _ = make()
    assert devs.assign("work", SDA, AUTO) == [
        ("work", "device-pre-assign:block", {"device": "sys-usb:sda::None", "options": "{}"}),
        ("work", "device-assign:block", {"device": "sys-usb:sda::None", "options": "{}"}),
    ]
    assert devs.assigned("work") == (
        "sys-usb+sda::None device_id=':None' port_id='sda' devclass='block' "
        "backend_domain='sys-usb' mode='auto-attach' frontend_domain='work'\n"
    )
    assert devs.attached("personal") == ""  # assigning never attaches by itself


def test_any_device_on_a_port_as_in_qubesd_test_470() -> None:
    devs, _ = make()
    devs.assign("work", "sys-usb+sda", b"mode='required'")
    assert devs.assigned("work", "sys-usb+sda") == (
        "sys-usb+sda:* device_id='*' port_id='sda' devclass='block' "
        "backend_domain='sys-usb' mode='required'\n"
    )
    assert devs.assigned("work", "sys-usb+sdb") == ""


ASSIGN_ERRORS: dict[str, tuple[str, bytes, type[BaseException]]] = {
    "manual-mode": (SDA, b"", ValueError),
    "unknown-backend": ("nosuch+sda", b"mode='required'", KeyError),
    "bad-mode": (SDA, b"mode='sometimes'", exc.ProtocolError),
    "other-port-in-payload": (SDA, b"port_id='sdb' mode='required'", exc.ProtocolError),
    "unknown-frontend-domain": (
        SDA,
        b"mode='required' frontend_domain='nosuch'",
        exc.ProtocolError,
    ),
}


@pytest.mark.parametrize(
    ("arg", "payload", "error"), ASSIGN_ERRORS.values(), ids=ASSIGN_ERRORS.keys()
)
def test_refused_assign_changes_nothing(
    arg: str, payload: bytes, error: type[BaseException]
) -> None:
    devs, _ = make()
    with pytest.raises(error):
        devs.assign("work", arg, payload)
    assert devs.assigned("work") == ""


def test_assigning_the_same_device_twice_is_already_assigned() -> None:
    devs, _ = make()
    devs.assign("work", SDA, AUTO)
    with pytest.raises(exc.DeviceAlreadyAssigned, match="already assigned to work"):
        devs.assign("work", SDA, b"mode='required'")
    devs.assign("work", "sys-usb+sda", b"mode='required'")  # "*" is another assignment


def test_unassign_needs_the_exact_device_id() -> None:
    devs, _ = make()
    devs.assign("work", SDA, AUTO)
    with pytest.raises(exc.DeviceNotAssigned):
        devs.unassign("work", "sys-usb+sda")
    assert devs.unassign("work", SDA) == [
        ("work", "device-unassign:block", {"device": "sys-usb:sda::None"})
    ]
    assert devs.assigned("work") == ""


def test_set_assignment_changes_mode_once() -> None:
    devs, _ = make()
    devs.assign("work", SDA, AUTO)
    events = devs.set_assignment("work", SDA, b"required")
    assert [e[1] for e in events] == ["device-pre-assign:block", "device-assignment-changed:block"]
    assert "mode='required'" in devs.assigned("work")
    assert devs.set_assignment("work", SDA, b"required") == []


@pytest.mark.parametrize(
    ("arg", "payload", "error"),
    [
        (SDA, b"manual", exc.PermissionDenied),
        (SDA, b"Required", exc.PermissionDenied),
        ("sys-usb+sdb++None", b"required", exc.QubesValueError),
    ],
    ids=["manual-refused", "case-sensitive", "not-assigned"],
)
def test_set_assignment_errors(arg: str, payload: bytes, error: type[BaseException]) -> None:
    devs, _ = make()
    devs.assign("work", SDA, AUTO)
    with pytest.raises(error):
        devs.set_assignment("work", arg, payload)


def test_auto_attach_when_the_frontend_starts() -> None:
    devs, qubes = make()
    devs.assign("work", SDA, AUTO)
    assert start(devs, qubes, "work") == [
        (
            "work",
            "device-attach:block",
            {
                "device": "sys-usb:sda::None",
                "options": "{'read-only': 'no', 'frontend-dev': 'xvdi'}",
            },
        )
    ]
    # Attached lists the assignment itself (its mode) for an exactly assigned device.
    assert devs.attached("work").startswith("sys-usb+sda::None device_id=':None' ")
    assert "mode='auto-attach'" in devs.attached("work")


def test_ask_to_attach_is_never_confirmed_in_the_emulator() -> None:
    devs, qubes = make()
    devs.assign("work", SDA, b"mode='ask-to-attach'")
    assert start(devs, qubes, "work") == []
    assert devs.attached("work") == ""


def test_auto_attach_skips_a_device_attached_elsewhere() -> None:
    devs, qubes = make()
    devs.attach("personal", SDA, b"")
    devs.assign("work", SDA, AUTO)
    assert start(devs, qubes, "work") == []


def test_required_device_is_attached_at_start_without_event() -> None:
    devs, qubes = make()
    devs.assign("work", "sys-usb+sdb", b"mode='required'")
    assert start(devs, qubes, "work") == []
    # R4.3 compares the exact device id: a "*" assignment does not claim the attachment,
    # which is listed as a manual one with the options libvirt got.
    assert devs.attached("work").endswith(
        "mode='manual' frontend_domain='work' _read-only='yes' _frontend-dev='xvdi'\n"
    )
    with pytest.raises(exc.QubesVMNotHaltedError, match="unassign device first"):
        devs.detach("work", "sys-usb+sdb")


def test_required_device_of_a_halted_backend_blocks_the_start() -> None:
    devs, qubes = make()
    devs.assign("work", "sys-usb+sda", b"mode='required'")
    qubes.running.discard("sys-usb")
    with pytest.raises(exc.QubesException, match=r"^Block device sys-usb:sda:\* not available$"):
        devs.check_start("work")


def test_backend_start_attaches_to_the_one_running_assignee() -> None:
    devs, qubes = make()
    devs.assign("personal", SDA, AUTO.replace(b"'work'", b"'personal'"))
    qubes.running.discard("sys-usb")
    events = start(devs, qubes, "sys-usb")
    assert [e[1] for e in events] == [
        "device-list-change:block",
        "device-added:block",
        "device-added:block",
        "device-attach:block",
    ]
    assert events[-1][0] == "personal"


def test_backend_start_with_two_candidates_attaches_nothing() -> None:
    devs, qubes = make()
    qubes.running.add("vault")
    devs.assign("personal", "sys-usb+sda", b"mode='auto-attach'")
    devs.assign("vault", "sys-usb+sda", b"mode='auto-attach'")
    qubes.running.discard("sys-usb")
    events = start(devs, qubes, "sys-usb")
    assert all(e[1] != "device-attach:block" for e in events)  # qubesd would ask the user


def test_provided_assignments_block_backend_removal() -> None:
    devs, _ = make()
    devs.assign("work", SDA, AUTO)
    assert devs.provided_assignments("sys-usb") == ["sda"]
    devs.forget("work")
    assert devs.provided_assignments("sys-usb") == []


def test_assignments_survive_a_json_round_trip() -> None:
    devs, qubes = make()
    devs.assign("work", SDA, AUTO + b" _read-only='yes'")
    data = json.loads(json.dumps(devs.to_json()))
    restored = BlockDevices.from_json(
        {"exposed": data["exposed"], "assigned": data["assigned"]}, qubes
    )
    assert restored.assigned("work") == devs.assigned("work")
    assert restored.assigned("work").endswith("_read-only='yes'\n")
