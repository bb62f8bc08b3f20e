"""Firewall and block devices (R4.3 ``admin.vm.firewall.*``, ``admin.vm.device.block.*``).

The rule grammar lives in :mod:`qubes_mcp.sim.firewall` and the device logic in
:mod:`qubes_mcp.sim.devices`; these handlers only do qubesd's envelope checks, fire the
events those modules return and save.
"""

from __future__ import annotations

import time

from qubes_mcp.sim.qubesd.api import Call, method


def _firewall_dest(call: Call) -> None:
    call.enforce(not call.arg)
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
    events = call.app.devices.attach(
        call.dest.name, call.arg, call.untrusted_payload, devices_denied=denied
    )
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Detach", no_payload=True)
async def vm_device_detach(call: Call) -> None:
    call.permission(device=call.arg)
    events = call.app.devices.detach(call.dest.name, call.arg)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Assign")
async def vm_device_assign(call: Call) -> None:
    call.permission(device=call.arg)
    events = call.app.devices.assign(call.dest.name, call.arg, call.untrusted_payload)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Unassign", no_payload=True)
async def vm_device_unassign(call: Call) -> None:
    call.permission(device=call.arg)
    events = call.app.devices.unassign(call.dest.name, call.arg)
    call.app.fire_device_events(events)
    call.save()


@method("admin.vm.device.block.Set.assignment")
async def vm_device_set_assignment(call: Call) -> None:
    call.permission(device=call.arg)
    events = call.app.devices.set_assignment(call.dest.name, call.arg, call.untrusted_payload)
    call.app.fire_device_events(events)
    call.save()


# The emulator has no PCI devices; R4.3 lists the class, so its read methods answer empty.
@method(
    "admin.vm.device.pci.{endpoint}",
    no_payload=True,
    endpoints=("Available", "Attached", "Assigned"),
)
async def vm_device_pci_list(call: Call) -> str:
    call.permission()
    return ""
