"""USB devices (the R4.3 USB proxy extension's ``usb`` class): listings, Attach/Detach rules,
life cycle, persistence."""

from __future__ import annotations

import pytest

from qubes_mcp.sim import exc
from qubes_mcp.sim.usb_devices import UsbDevices, UsbDeviceSpec
from tests.unit.test_devices_block import Qubes

STICK = UsbDeviceSpec("2-1", "0781", "5581", "SanDisk Corp.", "Cruzer Blade", "4C53")
ARG = "sys-usb+2-1+0781+5581+4C53+u080650"
# what qubesadmin sends for `vm.devices["usb"].attach(DeviceAssignment(dev))`
PAYLOAD = (
    b"device_id='0781:5581:4C53:u080650' port_id='2-1' devclass='usb' "
    b"backend_domain='sys-usb' mode='manual' frontend_domain='work'"
)


def make() -> tuple[UsbDevices, Qubes]:
    qubes = Qubes({"dom0", "sys-usb", "work", "personal"}, {"vault", "sys-off"})
    devs = UsbDevices(qubes)
    devs.expose("sys-usb", STICK)
    devs.expose("sys-off", UsbDeviceSpec("1-1"))
    return devs, qubes


def test_available_lists_a_running_backends_devices_with_the_protocols_keys() -> None:
    devs, _ = make()
    assert devs.available("sys-usb") == (
        "2-1:0781:5581:4C53:u080650 device_id='0781:5581:4C53:u080650' port_id='2-1' "
        "devclass='usb' backend_domain='sys-usb' vendor='SanDisk Corp.' "
        "product='Cruzer Blade' manufacturer='SanDisk Corp.' name='Cruzer Blade' "
        "serial='4C53' interfaces='u080650'\n"
    )
    assert devs.available("sys-off") == ""  # a halted backend publishes nothing


def test_attach_then_detach_with_events() -> None:
    devs, _ = make()
    events = devs.attach("work", ARG, PAYLOAD)
    assert [e[1] for e in events] == ["device-pre-attach:usb", "device-attach:usb"]
    assert "attachment='work'" in devs.available("sys-usb")
    assert devs.attached("work").startswith("sys-usb+2-1:0781:5581:4C53:u080650 ")
    assert [e[1] for e in devs.detach("work", "sys-usb+2-1+_")] == [
        "device-pre-detach:usb",
        "device-detach:usb",
    ]
    assert devs.attached("work") == ""


@pytest.mark.parametrize(
    ("frontend", "arg", "payload", "error"),
    [
        ("vault", ARG, b"", exc.QubesVMNotRunningError),  # frontend halted
        ("work", "sys-usb+9-9+_", b"", exc.ProtocolError),  # no such port
        ("work", "sys-off+1-1+_", b"", exc.ProtocolError),  # backend halted
        ("work", "nosuch+2-1+_", b"", KeyError),  # no such backend
        ("work", ARG, b"_read-only='yes'", exc.QubesException),  # the extension takes no options
        ("work", ARG, b"mode='required'", exc.ProtocolError),  # Attach is manual
        ("work", ARG, b"port_id='3-1'", exc.ProtocolError),  # payload names another device
        ("work", "sys-usb+2-1+dead+beef+x+u080650", b"", exc.ProtocolError),  # another device id
    ],
)
def test_attach_refusals_change_nothing(
    frontend: str, arg: str, payload: bytes, error: type[Exception]
) -> None:
    devs, _ = make()
    with pytest.raises(error):
        devs.attach(frontend, arg, payload)
    assert devs.attached(frontend) == "" and "attachment" not in devs.available("sys-usb")


def test_a_device_is_attached_once() -> None:
    devs, _ = make()
    devs.attach("work", ARG, b"")
    with pytest.raises(exc.DeviceAlreadyAttached):
        devs.attach("personal", ARG, b"")


def test_detach_of_what_is_not_attached_is_device_not_assigned() -> None:
    devs, _ = make()
    with pytest.raises(exc.DeviceNotAssigned):
        devs.detach("work", "sys-usb+2-1+_")


def test_a_backend_stopping_ends_its_attachments() -> None:
    devs, qubes = make()
    devs.attach("work", ARG, b"")
    events = devs.detach_all_of("sys-usb")
    qubes.running.discard("sys-usb")
    assert ("work", "device-detach:usb", {"port": "sys-usb:2-1"}) in events
    assert devs.attached("work") == ""


def test_exposed_devices_persist_and_attachments_do_not() -> None:
    devs, qubes = make()
    devs.attach("work", ARG, b"")
    again = UsbDevices.from_json(devs.to_json(), qubes)
    assert again.available("sys-usb") == make()[0].available("sys-usb")
    assert again.attached("work") == ""


@pytest.mark.parametrize(
    "entry",
    [{"port": "sda"}, {"port": "2-1", "vendor_id": "xyz"}, {"port": "2-1", "serial": "a'b"}],
)
def test_bad_fleet_entries_are_refused(entry: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        UsbDeviceSpec.from_fleet(entry)
