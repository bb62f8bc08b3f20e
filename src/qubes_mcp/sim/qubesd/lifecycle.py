"""Creating, removing, starting and stopping qubes, with R4.3's checks and event sequences.

Each power operation fires the events a real qubesd fires on the way
(``qubes/vm/qubesvm.py`` ``start``/``shutdown``/``kill`` and the libvirt "stopped" path), so
event consumers see what they would see on Qubes. When the app has a hypervisor (the
emulator's sandboxes, :mod:`qubes_mcp.sim.machine`), start boots the qube's sandbox, shutdown,
kill, pause and unpause act on its processes, and a sandbox that dies by itself is reported
through :func:`machine_died`, which halts the qube as libvirt's "stopped" event does.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
import uuid as uuidlib

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import dispvm, revisions, storage
from qubes_mcp.sim.qubesd.app import GIB, QubesApp, log
from qubes_mcp.sim.qubesd.vm import Label, Qube, Volume

# --- volumes -----------------------------------------------------------------------------


def _volumes_for(app: QubesApp, klass: str) -> dict[str, Volume]:
    pool = str(app.raw("default_pool"))
    rev = app.pools[pool].revisions_to_keep if pool in app.pools else 1
    kpool = str(app.raw("default_pool_kernel"))
    persistent_root = klass in ("TemplateVM", "StandaloneVM")
    disp = klass == "DispVM"
    return {
        "root": Volume(
            "root",
            pool,
            10 * GIB,
            save_on_stop=persistent_root,
            snap_on_start=not persistent_root,
            revisions_to_keep=rev if persistent_root else 0,
        ),
        "private": Volume(
            "private",
            pool,
            2 * GIB,
            save_on_stop=not disp,
            snap_on_start=disp,
            revisions_to_keep=0 if disp else rev,
        ),
        "volatile": Volume("volatile", pool, 12 * GIB if disp else 10 * GIB),
        "kernel": Volume("kernel", kpool, 0, rw=False),
    }


def volume_source(vm: Qube, vol: Volume) -> Qube | None:
    """The qube whose volume a ``snap_on_start`` volume snapshots (``source=``): up the
    template chain while that volume is itself a snapshot (``_update_volume_config_source``:
    a DispVM's root is its TemplateVM's, its private its disposable template's)."""
    if not vol.snap_on_start:
        return None
    holder = vm.template_or_none()
    while holder is not None:
        src = holder.volumes.get(vol.name)
        parent = holder.template_or_none()
        if src is None or not src.snap_on_start or parent is None:
            return holder
        holder = parent
    return None


def vid(vm: Qube, vol: Volume) -> str:
    return storage.vid(vm, vol)


# --- create / remove ---------------------------------------------------------------------


def create_vm(
    app: QubesApp,
    klass: str,
    name: str,
    label: Label,
    template: Qube | None = None,
    *,
    extra: dict[str, object] | None = None,
) -> Qube:
    """``add_new_vm`` + the class's ``__init__``: qid, uuid, volumes, what a disposable takes
    from its template (:mod:`.dispvm`), then ``domain-add``."""
    props: dict[str, object] = {
        "name": name,
        "qid": app.new_qid(),
        "uuid": str(uuidlib.uuid4()),
        "label": label.name,
    }
    if klass in ("AppVM", "DispVM"):
        if template is None:
            # R4.3 reads app.default_template, which has no default: unset, it is an
            # AttributeError (zero bytes); set to None, the QubesValueError below
            template = app.get("default_dispvm" if klass == "DispVM" else "default_template")
            if template is None:
                raise exc.QubesValueError(
                    "Template for the qube not specified, nor default template set."
                )
        if klass == "DispVM":
            dispvm.check_template(template)
        if klass == "AppVM" and template.klass == "AdminVM":
            # AppVM.__init__ reads template.volume_config, which AdminVM has not: zero bytes
            raise AttributeError("'AdminVM' object has no attribute 'volume_config'")
        if klass == "AppVM" and template.klass != "TemplateVM":
            # VMProperty.__set__ got the qube itself here, not a name: its repr is shown
            raise exc.QubesPropertyValueError(
                name,
                "template",
                template.name,
                f"wrong VM class: domains[{template!r}] is of type {template.klass} "
                "and not TemplateVM",
            )
        props["template"] = template.name
    props.update(extra or {})
    if klass == "DispVM" and "dispid" not in props:
        props["dispid"] = new_dispid(app)
    if klass == "DispVM" and not name:
        name = f"disp{props['dispid']}"
        props["name"] = name
    vm = Qube(app, klass, props)
    vm.volumes = {} if klass == "RemoteVM" else _volumes_for(app, klass)
    if klass == "DispVM" and template is not None:
        dispvm.take_volumes(vm.volumes, template)
    if klass != "RemoteVM" and not app.get("check_updates_vm", True):
        # QubesVM.__init__, before events are enabled: no event for it
        vm.features["check-updates"] = ""
    for prop in ("guivm", "audiovm"):
        # ext/gui and ext/audio on domain-init (the qube is in no stream yet)
        target = vm.get(prop, None)
        if target is not None:
            vm.tags[f"{prop}-{target.name}"] = None
    if klass == "DispVM" and template is not None:
        dispvm.inherit(app, vm, template)
    app.domains[name] = vm
    app.fire(None, "domain-add", vm=vm)
    return vm


def create_on_disk(app: QubesApp, vm: Qube, source: Qube | None = None) -> None:
    """Make the private volume's directory (copying ``source``'s for a disposable); a
    volume its pool's driver cannot create fails as in R4.3 (see :mod:`.storage`), and
    the qube is deleted again (``_vm_create``'s ``del self.app.domains[vm]``)."""
    try:
        storage.check_create(app, vm)
    except BaseException:
        remove_vm(app, vm)
        raise
    if source is not None and app.paths.private_dir(source.name).is_dir():
        shutil.copytree(app.paths.private_dir(source.name), app.paths.private_dir(vm.name))
    app.create_private_dir(vm)


def _dependencies(app: QubesApp, vm: Qube) -> list[str]:
    """``on_domain_pre_deleted``: global VM properties (even defaults) and explicit ones."""
    deps = [
        f"@GLOBAL:{p.name}"
        for p in app.defs.values()
        if p.kind == "vm" and app.get(p.name, None) is vm
    ]
    for other in app.domains.values():
        if other is vm:
            continue
        deps += [
            f"{other.name}:{p.name}"
            for p in other.defs.values()
            if p.kind == "vm" and other.props.get(p.name) == vm.name
        ]
    return deps


def remove_vm(app: QubesApp, vm: Qube) -> None:
    """``del app.domains[vm]``: halted check (QubesVM only: a RemoteVM is always "Running"),
    ``domain-pre-delete`` veto, then delete."""
    if vm.klass != "RemoteVM" and not vm.is_halted():
        raise exc.QubesVMNotHaltedError(vm.name)
    app.fire(None, "domain-pre-delete", pre=True, vm=vm)
    deps = _dependencies(app, vm)
    if deps:
        log.error("Cannot remove %s as it is used by %s", vm.name, ", ".join(deps))
        raise exc.QubesVMInUseError(
            vm.name,
            f"Domain is in use: {vm.name!r};  see 'journalctl -u qubesd -e' in dom0 for details",
        )
    provided = app.devices.provided_assignments(vm.name)
    if provided:
        raise exc.QubesVMInUseError(
            vm.name, "VM has devices assigned to other VMs: " + ", ".join(provided)
        )
    del app.domains[vm.name]
    for token, (owner, _vol) in list(app.clone_tokens.items()):
        if owner == vm.name:
            del app.clone_tokens[token]
    app.devices.forget(vm.name)
    app.usb_devices.forget(vm.name)
    app.remove_qube_dir(vm)
    app.fire(None, "domain-delete", vm=vm)


def new_dispid(app: QubesApp) -> int:
    """A random unused dispid in 1..9999 whose ``disp<N>`` name is free."""
    used = {vm.props.get("dispid") for vm in app.domains.values()}
    while True:
        dispid = secrets.randbelow(9999) + 1
        if dispid not in used and f"disp{dispid}" not in app.domains:
            return dispid


def new_dispvm(app: QubesApp, appvm: Qube | None) -> Qube:
    """``DispVM.from_appvm`` / ``gen_disposable``: a ``disp<N>`` qube with ``auto_cleanup``,
    its private volume a copy of the template's."""
    template = dispvm.check_can_generate(appvm)
    vm = create_vm(
        app,
        "DispVM",
        "",
        template.get("label"),
        template,
        extra={"auto_cleanup": True},
    )
    create_on_disk(app, vm, source=template)
    return vm


# --- power -------------------------------------------------------------------------------


async def start(app: QubesApp, vm: Qube) -> None:
    if vm.klass == "AdminVM":
        raise exc.QubesVMNotHaltedError(vm.name, "Cannot start Dom0 fake domain!")
    if vm.power != "Halted":
        return
    rationale = vm.features.get("prohibit-start", "")
    if rationale:
        reason = f"Qube start is prohibited. Rationale: {rationale}"
        app.fire(vm, "domain-start-failed", reason=reason)
        raise exc.QubesException(reason)
    app.fire(vm, "domain-pre-start", pre=True, start_guid=True, mem_required=None)
    netvm = vm.get("netvm", None) if vm.has_prop("netvm") else None
    try:
        app.devices.check_start(vm.name)  # required devices must be available
        if netvm is not None and netvm.klass != "AdminVM" and not netvm.is_running():
            await start(app, netvm)
    except exc.QubesException as err:
        app.fire(vm, "domain-start-failed", reason=str(err))
        raise
    app.fire(vm, "domain-pre-spawn", pre=True, start_guid=True)
    vm.power = "Transient"
    # the state the run starts from, the future revision: a copy of /rw, off the event loop
    # (the qube is Transient meanwhile, so a Revert is refused as R4.3's dirty volume is)
    await asyncio.to_thread(revisions.on_start, app, vm)
    if app.hypervisor is not None:
        try:
            await app.hypervisor.start(vm.name)
        except Exception as err:  # noqa: BLE001 - any failure to boot is a failed start
            vm.power = "Halted"
            revisions.on_stop(app, vm)  # R4.3 stops the storage of a start that failed
            reason = f"Failed to start {vm.name}: {err}"
            log.error("%s", reason)
            app.fire(vm, "domain-start-failed", reason=reason)
            raise exc.QubesException(reason) from None
    vm.xid = max((d.xid for d in app.domains.values()), default=0) + 1
    vm.start_time = str(time.time())
    for prop in ("xid", "stubdom_xid", "start_time"):
        app.fire(vm, "property-reset:" + prop, name=prop)
    app.fire(vm, "domain-spawn", start_guid=True)
    app.fire(vm, "domain-pre-unpaused", pre=True)
    app.fire(vm, "domain-unpaused")
    vm.power = "Running"
    app.fire(vm, "domain-start", start_guid=True)
    app.fire_device_events(app.devices.qube_started(vm.name))
    app.fire_device_events(app.usb_devices.qube_started(vm.name))


async def shutdown(app: QubesApp, vm: Qube, force: bool = False) -> None:
    if vm.klass == "AdminVM":
        # R4.3 calls AdminVM.shutdown() with kwargs it does not take: a TypeError, which
        # qubesd answers with zero bytes. Same for pause/unpause (no such method).
        raise TypeError("AdminVM.shutdown() got an unexpected keyword argument")
    if vm.is_halted():
        raise exc.QubesVMNotStartedError(vm.name)
    try:
        app.fire(vm, "domain-pre-shutdown", pre=True, force=force)
        if vm.get("provides_network"):
            users = [c.name for c in app.connected_vms(vm) if c.is_running()]
            if users and not force:
                raise exc.QubesVMInUseError(
                    vm.name, "There are other VMs connected to this VM: " + ", ".join(users)
                )
        if vm.is_paused() and not force:
            raise exc.QubesVMNotRunningError(vm.name)
    except exc.QubesException as err:
        app.fire(vm, "domain-shutdown-failed", reason=str(err))
        raise
    if app.hypervisor is not None:
        await app.hypervisor.shutdown(vm.name)
    _stopped(app, vm)


async def kill(app: QubesApp, vm: Qube) -> None:
    if vm.klass == "AdminVM":
        raise exc.QubesVMError(vm.name, "Cannot kill Dom0 fake domain!")
    if not vm.is_running():
        raise exc.QubesVMNotStartedError(vm.name)
    if app.hypervisor is not None:
        await app.hypervisor.kill(vm.name)
    _stopped(app, vm)


def machine_died(app: QubesApp, name: str) -> None:
    """The qube's sandbox ended by itself (crash, OOM): the domain is gone, as when libvirt
    reports a domain stopped that nobody shut down."""
    vm = app.domains.get(name)
    if vm is None or vm.is_halted():
        return
    log.warning("qube %s halted: its sandbox died", name)
    _stopped(app, vm)
    if app.autosave:
        app.save()


def _stopped(app: QubesApp, vm: Qube) -> None:
    vm.power = "Halted"
    vm.xid = -1
    vm.start_time = None
    revisions.on_stop(app, vm)  # on_domain_stopped's storage.stop(): commit, keep a revision
    app.fire(vm, "domain-stopped")
    app.fire_device_events(app.devices.detach_all_of(vm.name))
    app.fire_device_events(app.usb_devices.detach_all_of(vm.name))
    for prop in ("xid", "stubdom_xid", "start_time"):
        app.fire(vm, "property-reset:" + prop, name=prop)
    app.fire(vm, "domain-shutdown")
    if vm.klass == "DispVM" and vm.get("auto_cleanup", False) and vm.name in app.domains:
        try:
            remove_vm(app, vm)
        except exc.QubesException:
            # R4.3 logs a failed auto-cleanup; the stop itself succeeded
            log.exception("cannot remove disposable %s after it stopped", vm.name)


async def pause(app: QubesApp, vm: Qube) -> None:
    if vm.klass == "AdminVM":
        raise AttributeError("AdminVM has no pause()")
    if not vm.is_running():
        raise exc.QubesVMNotRunningError(vm.name)
    app.fire(vm, "domain-pre-paused", pre=True)
    if vm.power == "Paused":
        return  # libxl's suspend of a paused domain is a no-op: no new libvirt event
    if app.hypervisor is not None:
        await app.hypervisor.pause(vm.name)
    vm.power = "Paused"
    app.fire(vm, "domain-paused")


async def unpause(app: QubesApp, vm: Qube) -> None:
    if vm.klass == "AdminVM":
        raise AttributeError("AdminVM has no unpause()")
    if not vm.is_paused():
        raise exc.QubesVMNotPausedError(vm.name)
    app.fire(vm, "domain-pre-unpaused", pre=True)
    if app.hypervisor is not None:
        await app.hypervisor.unpause(vm.name)
    vm.power = "Running"
    app.fire(vm, "domain-unpaused")
