"""The emulated dom0's qrexec service directory (``ROOT/etc/qubes-rpc`` and friends).

In a real dom0, ``/etc/qubes-rpc/admin.<method>`` is a symlink to ``/var/run/qubesd.sock``
for every method in qubes-core-admin's ``ADMIN_API_METHODS_SIMPLE`` (its ``Makefile``), which
is how a qrexec call from a management qube reaches qubesd (a socket service). We create the
same links, pointing at the emulator's qubesd socket.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths

#: R4.3 ``ADMIN_API_METHODS_SIMPLE`` (qubes-core-admin ``Makefile``). Methods our qubesd does
#: not implement answer as qubesd does for unknown methods (no reply, exit 0 with no output).
ADMIN_METHODS: tuple[str, ...] = (
    "admin.deviceclass.List",
    "admin.vmclass.List",
    "admin.Events",
    "admin.backup.Execute",
    "admin.backup.Info",
    "admin.backup.Cancel",
    "admin.label.Create",
    "admin.label.Get",
    "admin.label.List",
    "admin.label.Index",
    "admin.label.Remove",
    "admin.pool.Add",
    "admin.pool.Info",
    "admin.pool.UsageDetails",
    "admin.pool.List",
    "admin.pool.ListDrivers",
    "admin.pool.Remove",
    "admin.pool.Set.ephemeral_volatile",
    "admin.pool.Set.revisions_to_keep",
    "admin.pool.volume.List",
    "admin.property.Get",
    "admin.property.GetAll",
    "admin.property.GetDefault",
    "admin.property.Help",
    "admin.property.HelpRst",
    "admin.property.List",
    "admin.property.Reset",
    "admin.property.Set",
    "admin.vm.Create.AppVM",
    "admin.vm.Create.DispVM",
    "admin.vm.Create.StandaloneVM",
    "admin.vm.Create.TemplateVM",
    "admin.vm.CreateInPool.AppVM",
    "admin.vm.CreateInPool.DispVM",
    "admin.vm.CreateInPool.StandaloneVM",
    "admin.vm.CreateInPool.TemplateVM",
    "admin.vm.CreateDisposable",
    "admin.vm.Kill",
    "admin.vm.List",
    "admin.vm.Pause",
    "admin.vm.Remove",
    "admin.vm.Shutdown",
    "admin.vm.Start",
    "admin.vm.Unpause",
    "admin.vm.device.pci.Assign",
    "admin.vm.device.pci.Assigned",
    "admin.vm.device.pci.Attach",
    "admin.vm.device.pci.Attached",
    "admin.vm.device.pci.Available",
    "admin.vm.device.pci.Detach",
    "admin.vm.device.pci.Set.assignment",
    "admin.vm.device.pci.Unassign",
    "admin.vm.device.block.Assign",
    "admin.vm.device.block.Assigned",
    "admin.vm.device.block.Attach",
    "admin.vm.device.block.Attached",
    "admin.vm.device.block.Available",
    "admin.vm.device.block.Detach",
    "admin.vm.device.block.Set.assignment",
    "admin.vm.device.block.Unassign",
    "admin.vm.device.usb.Assign",
    "admin.vm.device.usb.Assigned",
    "admin.vm.device.usb.Attach",
    "admin.vm.device.usb.Attached",
    "admin.vm.device.usb.Available",
    "admin.vm.device.usb.Detach",
    "admin.vm.device.usb.Set.assignment",
    "admin.vm.device.usb.Unassign",
    "admin.vm.device.mic.Assign",
    "admin.vm.device.mic.Assigned",
    "admin.vm.device.mic.Attach",
    "admin.vm.device.mic.Attached",
    "admin.vm.device.mic.Available",
    "admin.vm.device.mic.Detach",
    "admin.vm.device.mic.Set.assignment",
    "admin.vm.device.mic.Unassign",
    "admin.vm.device.denied.List",
    "admin.vm.device.denied.Add",
    "admin.vm.device.denied.Remove",
    "admin.vm.feature.CheckWithNetvm",
    "admin.vm.feature.CheckWithTemplate",
    "admin.vm.feature.CheckWithAdminVM",
    "admin.vm.feature.CheckWithTemplateAndAdminVM",
    "admin.vm.feature.Get",
    "admin.vm.feature.List",
    "admin.vm.feature.Remove",
    "admin.vm.feature.Set",
    "admin.vm.firewall.Flush",
    "admin.vm.firewall.Get",
    "admin.vm.firewall.Set",
    "admin.vm.firewall.GetPolicy",
    "admin.vm.firewall.SetPolicy",
    "admin.vm.firewall.Reload",
    "admin.vm.notes.Get",
    "admin.vm.notes.Set",
    "admin.vm.property.Get",
    "admin.vm.property.GetAll",
    "admin.vm.property.GetDefault",
    "admin.vm.property.Help",
    "admin.vm.property.HelpRst",
    "admin.vm.property.List",
    "admin.vm.property.Reset",
    "admin.vm.property.Set",
    "admin.vm.tag.Get",
    "admin.vm.tag.List",
    "admin.vm.tag.Remove",
    "admin.vm.tag.Set",
    "admin.vm.volume.Clear",
    "admin.vm.volume.CloneFrom",
    "admin.vm.volume.CloneTo",
    "admin.vm.volume.Info",
    "admin.vm.volume.List",
    "admin.vm.volume.ListSnapshots",
    "admin.vm.volume.Resize",
    "admin.vm.volume.Revert",
    "admin.vm.volume.Set.ephemeral",
    "admin.vm.volume.Set.revisions_to_keep",
    "admin.vm.volume.Set.rw",
    "admin.vm.Stats",
    "admin.vm.CurrentState",
)


def service_dirs(paths: SimPaths) -> tuple[Path, ...]:
    """Lookup order of dom0 services (QX ``QREXEC_SERVICE_PATH``)."""
    return (
        paths.root / "run" / "qubes-rpc",
        paths.root / "usr" / "local" / "etc" / "qubes-rpc",
        paths.rpc_dir,
    )


def find_dom0_service(paths: SimPaths, service: str, arg: str) -> Path | None:
    """The dom0 service file for ``service+arg``: ``service+arg`` in every directory first,
    then ``service``. Returns a path whose target is a socket or an executable file."""
    for name in (f"{service}+{arg}", service):
        for directory in service_dirs(paths):
            path = directory / name
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISSOCK(st.st_mode) or (stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK)):
                return path
    return None


def install_dom0_rpc(paths: SimPaths) -> None:
    """Create ``ROOT/etc/qubes-rpc/admin.*`` symlinks to the qubesd socket (idempotent;
    files the operator put there are left alone)."""
    paths.rpc_dir.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(paths.qubesd_sock, paths.rpc_dir)
    for method in ADMIN_METHODS:
        link = paths.rpc_dir / method
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target)
