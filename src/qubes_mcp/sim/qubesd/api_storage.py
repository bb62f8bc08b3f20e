"""Volumes, pools and labels (R4.3 ``admin.vm.volume.*``, ``admin.pool.*``, ``admin.label.*``).

The ``private`` volume of a qube is a real directory (``SimPaths.private_dir``); CloneTo
copies the source qube's directory, so a cloned qube starts with the same ``/rw``.
"""

from __future__ import annotations

import secrets
import shutil
import string

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import lifecycle, remotevm, storage
from qubes_mcp.sim.qubesd.api import Call, method, validate_size
from qubes_mcp.sim.qubesd.app import MAX_DEFAULT_LABEL
from qubes_mcp.sim.qubesd.vm import Label, Qube, Volume

VOLUME_KEYS = (
    "pool",
    "vid",
    "size",
    "usage",
    "rw",
    "source",
    "path",
    "save_on_stop",
    "snap_on_start",
    "revisions_to_keep",
    "ephemeral",
)
_TOKEN_CHARS = string.ascii_letters + string.digits
_LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")


def volume_info(vm: Qube, vol: Volume) -> dict[str, object]:
    source = lifecycle.volume_source(vm, vol)
    src_vol = source.volumes.get(vol.name) if source is not None else None
    vid = lifecycle.vid(vm, vol)
    source_vid = lifecycle.vid(source, src_vol) if source and src_vol else None
    return {
        "pool": vol.pool,
        "vid": vid,
        "size": src_vol.size if src_vol is not None else vol.size,
        "usage": vol.usage,
        "rw": vol.rw,
        "source": source_vid or "",
        "path": storage.path(vm.app, vm, vol, source_vid),
        "save_on_stop": vol.save_on_stop,
        "snap_on_start": vol.snap_on_start,
        "revisions_to_keep": vol.revisions_to_keep,
        "ephemeral": storage.ephemeral(vm.app, vol),
    }


@method("admin.vm.volume.List", no_payload=True)
async def vm_volume_list(call: Call) -> str:
    call.enforce(not call.arg)
    remotevm.refuse(call.dest, "volumes")
    names = call.filtered(list(call.dest.volumes)) if call.dest.klass != "AdminVM" else []
    return "".join(f"{n}\n" for n in names)


@method("admin.vm.volume.Info", no_payload=True)
async def vm_volume_info(call: Call) -> str:
    call.enforce(call.arg in call.dest.volumes)
    call.permission()
    info = volume_info(call.dest, call.dest.volumes[call.arg])
    text = "".join(f"{k}={'' if info[k] is None else info[k]}\n" for k in VOLUME_KEYS)
    return text + "is_outdated=False\n"


@method("admin.vm.volume.Resize")
async def vm_volume_resize(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    size = validate_size(call.untrusted_payload.strip())
    call.permission(size=size)
    vol = call.dest.volumes[call.arg]
    try:
        current = int(str(volume_info(call.dest, vol)["size"]))
        storage.check_resize(call.app, call.dest, vol, size, current)
        vol.size = size
    finally:
        call.save()


@method("admin.vm.volume.CloneFrom", no_payload=True)
async def vm_volume_clone_from(call: Call) -> str:
    call.enforce(call.arg in call.dest.volumes)
    call.permission(volume=call.arg)
    token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(32))
    call.enforce(token not in call.app.clone_tokens)
    call.app.clone_tokens[token] = (call.dest.name, call.arg)
    return token


@method("admin.vm.volume.CloneTo")
async def vm_volume_clone_to(call: Call) -> None:
    call.enforce(call.arg in call.dest.volumes)
    untrusted_token = call.untrusted_payload.decode("ascii").strip()
    call.enforce(untrusted_token in call.app.clone_tokens)
    src_name, src_vol_name = call.app.clone_tokens.pop(untrusted_token)
    src = call.app.domains.get(src_name)
    call.enforce(src is not None and src_vol_name in src.volumes)
    assert src is not None
    call.permission(src_volume=src_vol_name, dst_volume=call.arg)
    dst_vol = call.dest.volumes[call.arg]
    dst_vol.size = src.volumes[src_vol_name].size
    if call.arg == "private" and src_vol_name == "private":
        paths = call.app.paths
        target = paths.private_dir(call.dest.name)
        if target.exists():
            shutil.rmtree(target)
        source = paths.private_dir(src.name)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            target.mkdir(parents=True)
    call.save()


# --- pools -------------------------------------------------------------------------------


@method("admin.pool.List", no_payload=True)
async def pool_list(call: Call) -> str:
    call.enforce(not call.arg)
    call.enforce(call.dest.name == "dom0")
    return "".join(f"{p}\n" for p in call.filtered(list(call.app.pools)))


@method("admin.pool.Info", no_payload=True)
async def pool_info(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    pool = call.app.pools[call.arg]
    call.permission(pool=pool.name)
    text = "".join(f"{k}={v}\n" for k, v in sorted(pool.config().items()))
    figures = storage.figures(call.app, pool)
    if figures is not None:
        text += f"size={figures[0]}\nusage={figures[1]}\n"
    container = storage.included_in(call.app, pool)
    if container is not None:
        text += f"included_in={container.name}\n"
    return text


# --- labels ------------------------------------------------------------------------------


@method("admin.label.List", no_payload=True)
async def label_list(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(not call.arg)
    return "".join(f"{lb.name}\n" for lb in call.filtered(list(call.app.labels.values())))


def _label(call: Call) -> object:
    call.enforce(call.dest.name == "dom0")
    try:
        label = call.app.label_by_name(call.arg)
    except exc.QubesLabelNotFoundError:
        raise exc.QubesValueError() from None
    call.permission(label=label)
    return label


@method("admin.label.Get", no_payload=True)
async def label_get(call: Call) -> str:
    return str(getattr(_label(call), "color", ""))


@method("admin.label.Index", no_payload=True)
async def label_index(call: Call) -> str:
    return str(getattr(_label(call), "index", ""))


@method("admin.pool.UsageDetails", no_payload=True)
async def pool_usage_details(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(call.arg in call.app.pools)
    pool = call.app.pools[call.arg]
    call.permission(pool=pool.name)
    figures = storage.figures(call.app, pool)
    if figures is None:
        return ""
    details = {"data_size": figures[0], "data_usage": figures[1]}
    return "".join(f"{k}={v}\n" for k, v in sorted(details.items()))


@method("admin.label.Create")
async def label_create(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    call.enforce(not call.arg.isdigit())
    call.enforce(all(c in _LABEL_CHARS for c in call.arg))
    try:
        call.app.label_by_name(call.arg)
    except exc.QubesLabelNotFoundError:
        pass
    else:
        raise exc.QubesValueError("label already exists")
    untrusted_color = call.untrusted_payload.decode("ascii", "strict").strip()
    call.enforce(len(untrusted_color) == 8)
    call.enforce(untrusted_color.startswith("0x"))
    call.enforce(all(c in string.hexdigits for c in untrusted_color[2:]))
    color = untrusted_color  # sanitised: 0x + 6 hex digits
    call.permission(color=color)
    index = max(MAX_DEFAULT_LABEL, *call.app.labels) + 1
    call.app.labels[index] = Label(index, color, call.arg)
    call.save()


@method("admin.label.Remove", no_payload=True)
async def label_remove(call: Call) -> None:
    call.enforce(call.dest.name == "dom0")
    try:
        label = call.app.label_by_name(call.arg)
    except exc.QubesLabelNotFoundError:
        raise exc.QubesValueError() from None
    call.enforce(label.index > MAX_DEFAULT_LABEL)
    if any(vm.props.get("label") == label.name for vm in call.app.domains.values()):
        raise exc.QubesException("label still in use")
    call.permission(label=label)
    del call.app.labels[label.index]
    call.save()
