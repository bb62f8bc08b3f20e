"""What a volume does depends on its pool's driver, as in R4.3's ``qubes/storage/*.py``.

Three drivers are modelled: ``file`` (``FilePool``/``FileVolume``, what R4.3 picks for
``varlibqubes`` when ``/var/lib/qubes`` cannot reflink, and the emulator's default),
``file-reflink`` (``ReflinkPool``/``ReflinkVolume``, a fleet's choice) and ``linux-kernel``
(``LinuxKernel``/``LinuxModules``). Each function is one driver method's observable
behaviour: the path it reports, what ``resize``, ``import_data`` (``Clear``) and the
``revisions_to_keep``/``rw`` setters refuse, what ``create`` fails on, and the pool figures
``admin.pool.Info`` shows. Unhandled exceptions in R4.3 (``NotImplementedError``,
``AssertionError``) stay unhandled here: an empty reply.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qubes_mcp.sim import exc

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import Pool, QubesApp
    from qubes_mcp.sim.qubesd.vm import Qube, Volume

FILE = "file"
REFLINK = "file-reflink"
KERNEL = "linux-kernel"
#: drivers a fleet may give ``varlibqubes``
VARLIBQUBES_DRIVERS = (FILE, REFLINK)


def driver(app: QubesApp, vol: Volume) -> str:
    pool = app.pools.get(vol.pool)
    return pool.driver if pool is not None else FILE


def is_kernel_volume(app: QubesApp, vol: Volume) -> bool:
    """A volume of a ``linux-kernel`` pool behaves as R4.3's ``LinuxModules``."""
    return driver(app, vol) == KERNEL


def ephemeral(app: QubesApp, vol: Volume) -> bool:
    """``Volume.ephemeral``: the set value, else False for a snapshot, a saved or a
    read-only volume, else the pool's ``ephemeral_volatile`` (LinuxModules: always False)."""
    if is_kernel_volume(app, vol):
        return False
    if vol.ephemeral is not None:
        return vol.ephemeral
    if vol.snap_on_start or vol.save_on_stop or not vol.rw:
        return False
    pool = app.pools.get(vol.pool)
    return bool(pool.ephemeral_volatile) if pool is not None else False


def vid(vm: Qube, vol: Volume) -> str:
    """``<appvms|vm-templates>/NAME/VOLUME`` (``_vid_prefix``); a volume of a
    ``linux-kernel`` pool has the kernel version as vid (``LinuxModules.vid``)."""
    if driver(vm.app, vol) == KERNEL:
        # LinuxModules.vid reads vm.kernel: with default_kernel reset (no default) that
        # is an AttributeError, and every answer that shows the vid is an empty reply
        return str(vm.get("kernel") or "")
    kind = "vm-templates" if vm.klass == "TemplateVM" else "appvms"
    return f"{kind}/{vm.name}/{vol.name}"


def path(app: QubesApp, vm: Qube, vol: Volume, source_vid: str | None) -> str:
    """``Volume.path``: ``file`` shows a snapshot's origin image (``FileVolume.path``),
    ``file-reflink`` the volume's own ``-dirty.img`` (``ReflinkVolume.__init__``),
    ``linux-kernel`` ``KERNEL/modules.img`` or nothing without a kernel."""
    pool = app.pools.get(vol.pool)
    dir_path = pool.dir_path if pool is not None else "/var/lib/qubes"
    kind = driver(app, vol)
    if kind == KERNEL:
        kernel = vid(vm, vol)
        return f"{dir_path}/{kernel}/modules.img" if kernel else ""
    if kind == REFLINK:
        return f"{dir_path}/{vid(vm, vol)}-dirty.img"
    if vol.snap_on_start and source_vid:
        return f"{dir_path}/{source_vid}.img"
    return f"{dir_path}/{vid(vm, vol)}.img"


def check_resize(app: QubesApp, vm: Qube, vol: Volume, size: int, current: int) -> None:
    """The ``resize`` of each driver (admin.vm.volume.Resize)."""
    kind = driver(app, vol)
    if kind == KERNEL:
        # LinuxModules has no resize: Volume.resize's NotImplementedError, unhandled
        raise NotImplementedError("Volume LinuxModules has resize() not implemented")
    if kind == REFLINK:
        if not vol.rw:
            raise exc.StoragePoolException(f"Cannot resize: {vid(vm, vol)} is read-only")
        return
    if not vol.rw:
        raise exc.StoragePoolException(f"Can not resize readonly volume {vid(vm, vol)}")
    if vol.snap_on_start:
        # R4.3's message really lacks the space ("resize" "the" in file.py)
        raise exc.StoragePoolException(
            "Cannot resize volume based on a template - resizethe template instead"
        )
    if size < current:
        raise exc.StoragePoolException(
            f"For your own safety, shrinking of {vol.name} is disabled. If you really know "
            f"what you are doing, use `truncate` on {vid(vm, vol)} manually."
        )


def check_import(app: QubesApp, vm: Qube, vol: Volume) -> None:
    """``import_data`` (admin.vm.volume.Clear): only a ``save_on_stop`` volume."""
    kind = driver(app, vol)
    if kind == KERNEL:
        raise NotImplementedError("Volume LinuxModules has import_data() not implemented")
    if vol.save_on_stop:
        return
    if kind == REFLINK:
        raise NotImplementedError(f"Cannot import_data: {vid(vm, vol)} is not save_on_stop")
    raise exc.StoragePoolException(f"Can not import into save_on_stop=False volume {vid(vm, vol)}")


def check_revisions(app: QubesApp, vol: Volume, value: int) -> None:
    """The volume's ``revisions_to_keep`` setter."""
    kind = driver(app, vol)
    if kind == KERNEL and value:
        raise exc.QubesValueError("LinuxModules supports only revisions_to_keep=0")
    if kind == FILE and (value > 1 or value < -1):
        raise NotImplementedError("FileVolume supports maximum 1 volume revision to keep")


def check_rw(app: QubesApp, vol: Volume, value: bool) -> None:
    """The volume's ``rw`` setter: a kernel volume stays read-only."""
    if driver(app, vol) == KERNEL and value:
        raise exc.QubesValueError("LinuxModules supports only read-only volumes")


def check_create(app: QubesApp, vm: Qube) -> None:
    """``Pool.init_volume`` and ``Volume.create`` for a new qube's volumes: a writable
    volume in ``linux-kernel`` fails ``LinuxKernel.init_volume``'s ``assert not rw``, and
    ``FileVolume.create`` asserts a size above 0 (a kernel volume in a ``file`` pool has
    none)."""
    for vol in vm.volumes.values():
        kind = driver(app, vol)
        if kind == KERNEL and vol.rw:
            raise AssertionError("LinuxKernel.init_volume: assert not volume_config['rw']")
        if kind == FILE and not vol.snap_on_start and vol.size <= 0:
            raise AssertionError("Volume size must be > 0")


def included_in(app: QubesApp, pool: Pool) -> Pool | None:
    """``search_pool_containing_dir``: another filesystem pool whose directory contains
    this one's (``linux-kernel``'s ``/var/lib/qubes/vm-kernels`` is in ``varlibqubes``)."""
    for other in app.pools.values():
        if other is pool or other.driver not in (FILE, REFLINK, KERNEL):
            continue
        base = os.path.normpath(other.dir_path)
        if os.path.commonpath([base, os.path.normpath(pool.dir_path)]) == base:
            return other
    return None


def figures(app: QubesApp, pool: Pool) -> tuple[int, int] | None:
    """``(size, usage)`` of a filesystem pool: the fleet's size and the bytes its volumes
    own, or else ``statvfs`` of the emulator's root as R4.3 does of ``dir_path``;
    ``None`` for ``linux-kernel`` (``Pool.size``/``usage`` are ``None``)."""
    if pool.driver not in (FILE, REFLINK):
        return None
    if pool.size is not None:
        used = sum(
            vol.size
            for vm in app.domains.values()
            for vol in vm.volumes.values()
            if vol.pool == pool.name and not vol.snap_on_start
        )
        return pool.size, used
    st = os.statvfs(app.paths.root if app.paths.root.exists() else "/")
    return st.f_frsize * st.f_blocks, st.f_frsize * (st.f_blocks - st.f_bfree)


def pool_vids(app: QubesApp, pool: Pool) -> list[str]:
    """``pool.volumes``: every volume initialised in a filesystem pool, snapshots included
    (``FilePool._volumes`` / ``ReflinkPool._volumes``); for ``linux-kernel`` the kernels
    in use (the emulator has no ``vm-kernels`` directory to list)."""
    if pool.driver == KERNEL:
        kernels = [
            str(vm.get("kernel", None) or "")
            for vm in app.domains.values()
            if vm.has_prop("kernel") and "kernel" in vm.volumes
        ]
        return list(dict.fromkeys(k for k in kernels if k))
    return [
        vid(vm, vol)
        for vm in app.domains.values()
        for vol in vm.volumes.values()
        if vol.pool == pool.name
    ]
