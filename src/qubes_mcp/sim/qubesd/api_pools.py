"""``admin.pool.Add``, ``admin.pool.Remove`` and ``admin.pool.Set.*`` (R4.3
``qubes/api/admin.py`` ``pool_add``/``pool_remove``/``pool_set_*``, ``qubes/app.py``
``add_pool``/``remove_pool``).

The emulator can hold pools of the filesystem drivers (``file``, ``file-reflink``,
``linux-kernel``): they are configuration only, like every emulated volume. ``lvm_thin``,
``zfs`` and ``callback`` pools need a volume group, a ZFS dataset or a callback
configuration that no emulated dom0 has; their ``setup`` is refused.
"""

from __future__ import annotations

import os
import string

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import storage
from qubes_mcp.sim.qubesd.api import Call, method, validate_size
from qubes_mcp.sim.qubesd.api_extra import POOL_DRIVERS
from qubes_mcp.sim.qubesd.app import Pool
from qubes_mcp.sim.qubesd.propdef import parse_bool

_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
#: parameters without a default in each driver's ``__init__`` (``driver_parameters``)
_REQUIRED = {
    "callback": ("conf_id",),
    "file": ("dir_path",),
    "file-reflink": ("dir_path",),
    "linux-kernel": ("dir_path",),
    "lvm_thin": ("volume_group", "thin_pool"),
    "zfs": ("container",),
}
_PARAMS = {name: params.split() for name, params in POOL_DRIVERS}
_MODELLED = (storage.FILE, storage.REFLINK, storage.KERNEL)


def _pool_config(call: Call) -> tuple[str, dict[str, str]]:
    untrusted_lines = call.untrusted_payload.decode("ascii").splitlines()
    call.enforce(all("=" in line for line in untrusted_lines))
    untrusted_pairs = [line.split("=", 1) for line in untrusted_lines]
    keys = [pair[0] for pair in untrusted_pairs]
    call.enforce(len(set(keys)) == len(keys))
    untrusted_config = dict(untrusted_pairs)
    call.enforce("name" in untrusted_config)
    untrusted_name = untrusted_config.pop("name")
    call.enforce(all(c in _NAME_CHARS for c in untrusted_name))
    call.enforce(untrusted_name not in call.app.pools)
    name = untrusted_name
    unexpected = [k for k in untrusted_config if k not in _PARAMS[call.arg]]
    if unexpected:
        raise exc.QubesException("unexpected driver options: " + " ".join(unexpected))
    unmet = [k for k in _REQUIRED[call.arg] if k not in untrusted_config]
    if unmet:
        raise exc.QubesException("missing required driver options: " + " ".join(unmet))
    return name, untrusted_config  # keys checked; values are parsed by the driver


@method("admin.pool.Add")
async def pool_add(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    if call.arg not in _PARAMS:
        raise exc.QubesException("unexpected driver name: " + call.arg)
    name, config = _pool_config(call)
    call.permission(name=name, pool_config=config)
    if call.arg not in _MODELLED:
        raise exc.StoragePoolException(
            f"{call.arg} pools are not available in the emulated dom0 (no backing storage)"
        )
    # the driver's __init__: int()/parse_bool() raise ValueError (an empty reply) on junk
    revisions = int(config.get("revisions_to_keep", "1"))
    if call.arg == storage.FILE and revisions > 1:
        raise NotImplementedError("FilePool supports maximum 1 volume revision to keep")
    ephemeral = parse_bool(config.get("ephemeral_volatile", "False"))
    pool = Pool(
        name,
        call.arg,
        os.path.normpath(config["dir_path"]),
        revisions_to_keep=0 if call.arg == storage.KERNEL else revisions,
        ephemeral_volatile=ephemeral,
    )
    call.app.pools[name] = pool
    call.app.fire(None, "pool-add", pool=name)
    call.save()


@method("admin.pool.Remove", no_payload=True)
async def pool_remove(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    call.permission()
    pool = call.app.pools[call.arg]
    if any(
        vol.pool == pool.name for vm in call.app.domains.values() for vol in vm.volumes.values()
    ):
        raise exc.QubesPoolInUseError(pool.name)
    for suffix in ("", "_kernel", "_private", "_root", "_volatile"):
        if call.app.get("default_pool" + suffix, None) == pool.name:
            raise exc.QubesPoolInUseError(
                pool.name, f"Storage pool is in use: set as default_pool{suffix}"
            )
    call.app.fire(None, "pool-pre-delete", pre=True, pool=pool.name)
    del call.app.pools[pool.name]
    call.app.fire(None, "pool-delete", pool=pool.name)
    call.save()


@method("admin.pool.Set.revisions_to_keep")
async def pool_set_revisions_to_keep(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    pool = call.app.pools[call.arg]
    newvalue = validate_size(call.untrusted_payload, allow_negative=True)
    if newvalue < -1:
        raise exc.ProtocolError("Invalid value for revisions_to_keep")
    call.permission(newvalue=newvalue)
    if pool.driver == storage.FILE and newvalue > 1:
        raise NotImplementedError("FilePool supports maximum 1 volume revision to keep")
    pool.revisions_to_keep = newvalue
    call.save()


@method("admin.pool.Set.ephemeral_volatile")
async def pool_set_ephemeral(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    pool = call.app.pools[call.arg]
    try:
        newvalue = parse_bool(call.untrusted_payload.decode("ascii", "strict"))
    except (UnicodeDecodeError, exc.QubesValueError):
        raise exc.ProtocolError("Invalid value") from None
    call.permission(newvalue=newvalue)
    pool.ephemeral_volatile = newvalue
    call.save()
