"""Firewall, block and USB devices (R4.3 ``admin.vm.firewall.*``, ``admin.vm.device.block.*``,
``admin.vm.device.usb.*``).

The rule grammar lives in :mod:`qubes_mcp.sim.firewall` and the device logic in
:mod:`qubes_mcp.sim.devices`; these handlers only do qubesd's envelope checks, fire the
events those modules return and save.
"""

from __future__ import annotations

import time

from qubes_mcp.sim import exc
from qubes_mcp.sim.device_wire import DeviceRef
from qubes_mcp.sim.qubesd import remotevm
from qubes_mcp.sim.qubesd.api import Call, method


def _firewall_dest(call: Call) -> None:
    call.enforce(not call.arg)
    remotevm.refuse(call.dest, "firewall")
    if call.dest.klass == "AdminVM":
        # R4.3: AdminVM has no ``firewall`` attribute (AttributeError, zero bytes)
        raise AttributeError("'AdminVM' object has no attribute 'firewall'")


@method("admin.vm.firewall.Get", no_payload=True)
async def vm_firewall_get(call: Call) -> str:
    _firewall_dest(call)
    call.permission()
    return call.dest.firewall.api_get(time.time())


@method("admin.vm.firewall.Set")
async def vm_firewall_set(call: Call) -> None:
    _firewall_dest(call)
    # the parser is all-or-nothing: a bad line raises ValueError and changes nothing
    from qubes_mcp.sim.firewall import Firewall

    candidate = Firewall(call.dest.firewall.rules)
    candidate.api_set(call.untrusted_payload)
    call.permission(rules=list(candidate.rules))
    call.dest.firewall = candidate
    call.save()
    call.app.fire(call.dest, "firewall-changed")


@method("admin.vm.firewall.Reload", no_payload=True)
async def vm_firewall_reload(call: Call) -> None:
    _firewall_dest(call)
    call.permission()
    call.app.fire(call.dest, "firewall-changed")


@method("admin.vm.device.block.Available", no_payload=True)
async def vm_device_available(call: Call) -> str:
    call.permission()
    return call.app.devices.available(call.dest.name, call.arg)


@method("admin.vm.device.block.Attached", no_payload=True)
async def vm_device_attached(call: Call) -> str:
    call.permission()
    return call.app.devices.attached(call.dest.name, call.arg)


@method("admin.vm.device.block.Assigned", no_payload=True)
async def vm_device_assigned(call: Call) -> str:
    call.permission()
    return call.app.devices.assigned(call.dest.name, call.arg)


@method("admin.vm.device.block.Attach")
async def vm_device_attach(call: Call) -> None:
    denied = str(call.dest.get("devices_denied", ""))
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.devices.attach(
        call.dest.name, call.arg, call.untrusted_payload, devices_denied=denied
    )
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Detach", no_payload=True)
async def vm_device_detach(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.devices.detach(call.dest.name, call.arg)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Assign")
async def vm_device_assign(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.devices.assign(call.dest.name, call.arg, call.untrusted_payload)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Unassign", no_payload=True)
async def vm_device_unassign(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.devices.unassign(call.dest.name, call.arg)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Set.assignment")
async def vm_device_set_assignment(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.devices.set_assignment(call.dest.name, call.arg, call.untrusted_payload)
    call.app.fire_device_events(events)
    call.save()


# --- usb: R4.3's USB proxy extension (sim.usb_devices) ----------------------------------------


@method(
    "admin.vm.device.usb.{endpoint}",
    no_payload=True,
    endpoints=("Available", "Attached", "Assigned"),
)
async def vm_device_usb_list(call: Call) -> str:
    call.permission()
    usb = call.app.usb_devices
    lister = {"Available": usb.available, "Attached": usb.attached, "Assigned": usb.assigned}
    return lister[call.method.rsplit(".", 1)[1]](call.dest.name, call.arg)


@method("admin.vm.device.usb.Attach")
async def vm_device_usb_attach(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.usb_devices.attach(call.dest.name, call.arg, call.untrusted_payload)
    call.app.fire_device_events(events)


@method("admin.vm.device.usb.Detach", no_payload=True)
async def vm_device_usb_detach(call: Call) -> None:
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    events = call.app.usb_devices.detach(call.dest.name, call.arg)
    call.app.fire_device_events(events)


# The emulator has no PCI devices; R4.3 lists the class, so its read methods answer empty.
@method(
    "admin.vm.device.pci.{endpoint}",
    no_payload=True,
    endpoints=("Available", "Attached", "Assigned"),
)
async def vm_device_pci_list(call: Call) -> str:
    call.permission()
    return ""


# PCI writes on a dom0 that exposes no PCI device (R4.3 qubes/devices.py DeviceCollection):
# nothing can be attached (an unknown device is a ProtocolError: zero bytes), so nothing
# is attached or assigned to detach, unassign or change.


def _pci_ref(call: Call) -> DeviceRef:
    ref = DeviceRef.from_qarg(call.arg)  # no "+": ValueError, zero bytes
    if ref.backend != "*" and ref.backend not in call.app.domains:
        raise KeyError(ref.backend)  # load_device_info's domains lookup
    return ref


@method("admin.vm.device.pci.Attach")
async def vm_device_pci_attach(call: Call) -> None:
    ref = _pci_ref(call)
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    if call.dest.is_halted():
        raise exc.QubesVMNotRunningError(
            call.dest.name, "VM not running, cannot attach device, do you mean `assign`?"
        )
    raise exc.ProtocolError(f"pci device not recognized in {ref.port_id} port.")


@method("admin.vm.device.pci.Detach", no_payload=True)
async def vm_device_pci_detach(call: Call) -> None:
    ref = _pci_ref(call)
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    raise exc.DeviceNotAssigned(f"pci device {ref.port_id} not attached to {call.dest.name}")


@method("admin.vm.device.pci.Unassign", no_payload=True)
async def vm_device_pci_unassign(call: Call) -> None:
    ref = _pci_ref(call)
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    shown = f"{ref.backend}:{ref.port_id}:{ref.device_id}"
    raise exc.DeviceNotAssigned(f"pci device {shown} not assigned to {call.dest.name}")


@method("admin.vm.device.pci.Set.assignment")
async def vm_device_pci_set_assignment(call: Call) -> None:
    if call.untrusted_payload not in (b"required", b"ask-to-attach", b"auto-attach"):
        raise exc.PermissionDenied()
    ref = _pci_ref(call)
    call.permission(device=call.arg)
    remotevm.refuse(call.dest, "devices")
    shown = f"{ref.backend}:{ref.port_id}:{ref.device_id}"
    raise exc.QubesValueError(f"Device {shown} not assigned to {call.dest.name}")
