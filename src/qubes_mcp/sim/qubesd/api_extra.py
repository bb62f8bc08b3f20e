"""Less common R4.3 methods: suspend/resume, volume settings and snapshots, pool drivers,
and the per-qube denied device interfaces (``admin.vm.device.denied.*``).

Revisions of the private volume are kept by :mod:`.revisions` (``ListSnapshots``,
``Revert``), as the pool's driver keeps them.
"""

from __future__ import annotations

import shutil

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import lifecycle, remotevm, revisions, storage
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.api import Call, method, validate_size

#: ``admin.pool.ListDrivers``: the ``qubes.storage`` entry points, sorted by name as in an
#: installed ``entry_points.txt``, and the parameters of each driver's ``__init__``
#: (``driver_parameters``: all but ``self``, ``name``, ``kwargs``, in signature order)
POOL_DRIVERS = (
    ("callback", "conf_id"),
    ("file", "revisions_to_keep dir_path ephemeral_volatile"),
    ("file-reflink", "revisions_to_keep dir_path setup_check ephemeral_volatile"),
    ("linux-kernel", "dir_path"),
    ("lvm_thin", "revisions_to_keep volume_group thin_pool ephemeral_volatile"),
    ("zfs", "revisions_to_keep container ephemeral_volatile snap_on_start_forensics"),
)


@method("admin.vm.Suspend", no_payload=True)
async def vm_suspend(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "suspend")
    vm = call.dest
    if vm.klass == "AdminVM":
        raise exc.QubesVMError(vm.name, "Cannot suspend Dom0 fake domain!")
    if not vm.is_running():
        raise exc.QubesVMNotRunningError(vm.name)
    vm.power = "Suspended"


@method("admin.vm.Resume", no_payload=True)
async def vm_resume(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "resume")
    vm = call.dest
    if vm.klass == "AdminVM":
        raise AttributeError("AdminVM has no resume()")
    if vm.power == "Suspended":
        vm.power = "Running"
        call.app.fire(vm, "domain-resumed")
    else:
        await lifecycle.unpause(call.app, vm)


# --- volumes -----------------------------------------------------------------------------


@method("admin.vm.volume.ListSnapshots", no_payload=True)
async def vm_volume_list_snapshots(call: Call) -> str:
    call.enforce(call.arg in call.dest.volumes)
    listed = revisions.listed(call.app, call.dest, call.dest.volumes[call.arg])
    return "".join(f"{r}\n" for r in call.filtered(listed))


@method("admin.vm.volume.Revert")
async def vm_volume_revert(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    untrusted_revision = call.untrusted_payload.decode("ascii").strip()
    vol = call.dest.volumes[call.arg]
    call.enforce(untrusted_revision in revisions.revisions(call.app, call.dest, vol))
    revision = untrusted_revision
    call.permission(volume=call.arg, revision=revision)
    revisions.revert(call.app, call.dest, vol, revision)
    call.save()


@method("admin.vm.volume.Set.revisions_to_keep")
async def vm_volume_set_revisions(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    newvalue = validate_size(call.untrusted_payload, allow_negative=True)
    call.permission(newvalue=newvalue)
    vol = call.dest.volumes[call.arg]
    if newvalue < -1:
        raise exc.QubesValueError("Invalid value for revisions_to_keep")
    toggles = newvalue != vol.revisions_to_keep and -1 in (vol.revisions_to_keep, newvalue)
    if call.dest.is_running() and toggles:
        raise exc.QubesVMNotHaltedError(call.dest.name)
    storage.check_revisions(call.app, vol, newvalue)
    vol.revisions_to_keep = newvalue
    call.save()


def _payload_bool(call: Call) -> bool:
    try:
        return pdefs.parse_bool(call.untrusted_payload.decode("ascii"))
    except (UnicodeDecodeError, exc.QubesValueError):
        raise exc.ProtocolError("Invalid value") from None


@method("admin.vm.volume.Set.rw")
async def vm_volume_set_rw(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    newvalue = _payload_bool(call)
    call.permission(newvalue=newvalue)
    if not call.dest.is_halted():
        raise exc.QubesVMNotHaltedError(call.dest.name)
    storage.check_rw(call.app, call.dest.volumes[call.arg], newvalue)
    call.dest.volumes[call.arg].rw = newvalue
    call.save()


@method("admin.vm.volume.Set.ephemeral")
async def vm_volume_set_ephemeral(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    newvalue = _payload_bool(call)
    call.permission(newvalue=newvalue)
    vol = call.dest.volumes[call.arg]
    if storage.is_kernel_volume(call.app, vol):
        raise exc.QubesValueError("LinuxModules does not support setting ephemeral value")
    if newvalue and (vol.snap_on_start or vol.save_on_stop or not vol.rw):
        # Volume.ephemeral's setter (qubes/storage/__init__.py)
        raise exc.QubesValueError(
            "Cannot enable ephemeral on snap_on_start or save_on_stop or non-dom0 or "
            "not writable volume"
        )
    vol.ephemeral = newvalue
    call.save()


@method("admin.vm.volume.Clear", no_payload=True)
async def vm_volume_clear(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    call.permission()
    vol = call.dest.volumes[call.arg]
    storage.check_import(call.app, call.dest, vol)
    if not call.dest.is_halted():
        raise exc.QubesVMNotHaltedError(call.dest.name)
    call.app.fire(call.dest, "domain-volume-import-begin", volume=call.arg, size=vol.size)
    if call.arg == "private":
        target = call.app.paths.private_dir(call.dest.name)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    call.app.fire(call.dest, "domain-volume-import-end", volume=call.arg, success=True)
    call.save()


# --- pools -------------------------------------------------------------------------------


@method("admin.pool.ListDrivers", no_payload=True)
async def pool_list_drivers(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(not call.arg)
    drivers = call.filtered(list(POOL_DRIVERS))
    return "".join(f"{name} {params}\n" for name, params in drivers)


@method("admin.pool.volume.List", no_payload=True)
async def pool_volume_list(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    vids = storage.pool_vids(call.app, call.app.pools[call.arg])
    return "".join(f"{v}\n" for v in call.filtered(vids))


# --- denied device interfaces ------------------------------------------------------------


def split_interfaces(text: str) -> list[str]:
    """``DeviceInterface.from_str_bulk``: 7-character interface codes."""
    if len(text) % 7 != 0:
        raise exc.QubesValueError(
            f"Invalid length of interfaces={text!r} (is {len(text)}, expected multiple of 7)"
        )
    return [text[i : i + 7] for i in range(0, len(text), 7)]


@method("admin.vm.device.denied.List", no_payload=True)
async def vm_device_denied_list(call: Call) -> str:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "devices_denied")
    return "\n".join(split_interfaces(str(call.dest.get("devices_denied", ""))))


@method("admin.vm.device.denied.Add")
async def vm_device_denied_add(call: Call) -> None:
    to_add = split_interfaces(call.untrusted_payload.decode("ascii", errors="strict"))
    if len(set(to_add)) != len(to_add):
        raise exc.QubesValueError("Duplicated device interfaces in payload.")
    call.permission(interfaces=to_add)
    remotevm.refuse(call.dest, "devices_denied")
    prev = str(call.dest.get("devices_denied", ""))
    call.app.set_prop(call.dest, "devices_denied", prev + "".join(to_add))
    if prev != call.dest.get("devices_denied", ""):
        call.save()


@method("admin.vm.device.denied.Remove")
async def vm_device_denied_remove(call: Call) -> None:
    denied = split_interfaces(str(call.dest.get("devices_denied", "")))
    payload = call.untrusted_payload.decode("ascii", errors="strict")
    to_remove = split_interfaces(payload) if payload != "all" else list(denied)
    if len(set(to_remove)) != len(to_remove):
        raise exc.QubesValueError("Duplicated device interfaces in payload.")
    call.permission(interfaces=to_remove)
    remotevm.refuse(call.dest, "devices_denied")
    new_denied = "".join(i for i in denied if i not in to_remove)
    if new_denied != call.dest.get("devices_denied", ""):
        call.app.set_prop(call.dest, "devices_denied", new_denied)
        call.save()
