"""Admin API methods on qubes: List, tags, features, power, create/remove, notes, state.

Shapes and errors follow R4.3 ``qubes/api/admin.py``; where a handler only ``enforce``-s,
the refusal is a zero-byte reply, as on R4.3.
"""

from __future__ import annotations

import unicodedata

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import dispvm, lifecycle, names, remotevm
from qubes_mcp.sim.qubesd.api import Call, method
from qubes_mcp.sim.qubesd.vm import Qube

#: Entry points in the order ``importlib.metadata`` reads them from ``entry_points.txt``,
#: which setuptools writes sorted by name within each group (``_entry_points.render``): the
#: order of every installed dom0, not the order of ``setup.py``.
VM_CLASSES = ("AdminVM", "AppVM", "DispVM", "RemoteVM", "StandaloneVM", "TemplateVM")
#: Classes the emulator can instantiate (RemoteVM is listed but not modelled).
CREATABLE = ("AppVM", "TemplateVM", "StandaloneVM", "DispVM", "RemoteVM")
DEVICE_CLASSES = ("block", "pci")
MAX_NOTES = 256000


@method("admin.vmclass.List", no_payload=True)
async def vmclass_list(call: Call) -> str:
    call.enforce(not call.arg)
    call.enforce(call.dest.name == "dom0")
    return "".join(f"{c}\n" for c in call.filtered(list(VM_CLASSES)))


@method("admin.deviceclass.List", no_payload=True)
async def deviceclass_list(call: Call) -> str:
    call.enforce(not call.arg)
    call.enforce(call.dest.name == "dom0")
    return "".join(f"{c}\n" for c in call.filtered(list(DEVICE_CLASSES)))


@method("admin.vm.List", no_payload=True)
async def vm_list(call: Call) -> str:
    call.enforce(not call.arg)
    domains = list(call.app.domains.values()) if call.dest.name == "dom0" else [call.dest]
    domains = call.filtered(domains)
    return "".join(
        f"{vm.name} class={vm.klass} state={vm.power} uuid={vm.uuid}\n"
        # R4.3 sorts with QubesVM.__lt__, which is never true against AdminVM: dom0 first
        for vm in sorted(domains, key=lambda v: (v.klass != "AdminVM", v.name))
    )


# --- tags --------------------------------------------------------------------------------


@method("admin.vm.tag.List", no_payload=True)
async def vm_tag_list(call: Call) -> str:
    call.enforce(not call.arg)
    return "".join(f"{t}\n" for t in sorted(call.filtered(list(call.dest.tags))))


@method("admin.vm.tag.Get", no_payload=True)
async def vm_tag_get(call: Call) -> str:
    names.validate_tag(call.arg)
    call.permission()
    return "1" if call.arg in call.dest.tags else "0"


@method("admin.vm.tag.Set", no_payload=True)
async def vm_tag_set(call: Call) -> None:
    names.validate_tag(call.arg)
    call.permission()
    call.app.add_tag(call.dest, call.arg)
    call.save()


@method("admin.vm.tag.Remove", no_payload=True)
async def vm_tag_remove(call: Call) -> None:
    names.validate_tag(call.arg)
    call.permission()
    if call.arg not in call.dest.tags:
        raise exc.QubesTagNotFoundError(call.dest.name, call.arg)
    call.app.remove_tag(call.dest, call.arg)
    call.save()


# --- features ----------------------------------------------------------------------------


@method("admin.vm.feature.List", no_payload=True)
async def vm_feature_list(call: Call) -> str:
    call.enforce(not call.arg)
    return "".join(f"{f}\n" for f in call.filtered(list(call.dest.features)))


@method("admin.vm.feature.Get", no_payload=True)
async def vm_feature_get(call: Call) -> str:
    call.permission()
    if call.arg not in call.dest.features:
        raise exc.QubesFeatureNotFoundError(call.dest.name, call.arg)
    return call.dest.features[call.arg]


_CHECK_ALONG = {
    "CheckWithTemplate": "template",
    "CheckWithNetvm": "netvm",
    "CheckWithAdminVM": None,
    "CheckWithTemplateAndAdminVM": "template+adminvm",
}


@method("admin.vm.feature.{endpoint}", no_payload=True, endpoints=tuple(_CHECK_ALONG))
async def vm_feature_check(call: Call) -> str:
    call.permission()
    try:
        return str(call.dest.check_feature(_CHECK_ALONG[call.endpoint], call.arg))
    except KeyError:
        raise exc.QubesFeatureNotFoundError(call.dest.name, call.arg) from None


@method("admin.vm.feature.Remove", no_payload=True)
async def vm_feature_remove(call: Call) -> None:
    call.permission()
    if call.arg not in call.dest.features:
        raise exc.QubesFeatureNotFoundError(call.dest.name, call.arg)
    call.app.remove_feature(call.dest, call.arg)
    call.save()


@method("admin.vm.feature.Set")
async def vm_feature_set(call: Call) -> None:
    untrusted_value = call.untrusted_payload.decode("ascii", errors="strict")
    if not names.FEATURE_NAME_RE.match(call.arg):
        raise exc.QubesValueError("feature name contains illegal characters")
    if not names.FEATURE_VALUE_RE.match(untrusted_value):
        raise exc.QubesValueError(f"{call.arg} value contains illegal characters")
    value = untrusted_value  # sanitised: printable ASCII only
    call.permission(value=value)
    call.app.set_feature(call.dest, call.arg, value)
    call.save()


# --- power -------------------------------------------------------------------------------


@method("admin.vm.Start", no_payload=True)
async def vm_start(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "start")
    await lifecycle.start(call.app, call.dest)


@method("admin.vm.Shutdown", no_payload=True)
async def vm_shutdown(call: Call) -> None:
    args = call.arg.split("+") if call.arg else []
    call.enforce(all(a in ("force", "wait") for a in args))
    force = "force" in args
    call.permission(force=force, wait="wait" in args)
    remotevm.refuse(call.dest, "shutdown")
    await lifecycle.shutdown(call.app, call.dest, force=force)
    call.save()


@method("admin.vm.Pause", no_payload=True)
async def vm_pause(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "pause")
    await lifecycle.pause(call.app, call.dest)


@method("admin.vm.Unpause", no_payload=True)
async def vm_unpause(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "unpause")
    await lifecycle.unpause(call.app, call.dest)


@method("admin.vm.Kill", no_payload=True)
async def vm_kill(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    remotevm.refuse(call.dest, "kill")
    await lifecycle.kill(call.app, call.dest)
    call.save()


@method("admin.vm.CurrentState", no_payload=True)
async def vm_current_state(call: Call) -> str:
    call.enforce(not call.arg)
    call.permission()
    vm = call.dest
    mem = 0
    if vm.klass == "RemoteVM":  # remotevm.py: get_mem/get_mem_static_max/get_cputime are 0
        return "mem=0 mem_static_max=0 cputime=0 power_state=Running"
    if vm.klass == "AdminVM" or vm.is_running():
        mem = int(vm.get("memory", 4096)) * 1024
    return f"mem={mem} mem_static_max={mem} cputime=0 power_state={vm.power}"


# --- create / remove ---------------------------------------------------------------------


def _parse_create(
    call: Call, allow_pool: bool
) -> tuple[dict[str, str], str | None, dict[str, str]]:
    kwargs: dict[str, str] = {}
    pool: str | None = None
    pools: dict[str, str] = {}
    for untrusted_param in call.untrusted_payload.decode("ascii", errors="strict").split(" "):
        untrusted_key, untrusted_value = untrusted_param.split("=", 1)
        if untrusted_key in kwargs:
            raise exc.ProtocolError("duplicated parameters")
        if untrusted_key == "name":
            kwargs["name"] = names.validate_name(untrusted_value)
        elif untrusted_key == "label":
            call.enforce(names.is_valid_label_name(untrusted_value))
            kwargs["label"] = call.app.label_by_name(untrusted_value).name
        elif untrusted_key == "pool" and allow_pool:
            if pool is not None:
                raise exc.ProtocolError("duplicated pool parameter")
            pool = _pool(call, untrusted_value)
        elif untrusted_key.startswith("pool:") and allow_pool:
            volume = untrusted_key.split(":", 1)[1]
            call.enforce(volume in ("root", "private", "volatile", "kernel"))
            if volume in pools:
                raise exc.ProtocolError(f"duplicated pool:{volume} parameter")
            pools[volume] = _pool(call, untrusted_value)
        else:
            raise exc.ProtocolError("Invalid param name")
    if "name" not in kwargs or "label" not in kwargs:
        raise exc.ProtocolError("Missing name or label")
    if pool and pools:
        raise exc.ProtocolError("Only one of 'pool=' and 'pool:volume=' can be used")
    return kwargs, pool, pools


def _pool(call: Call, name: str) -> str:
    if name not in call.app.pools:
        raise exc.QubesException("Unknown storage pool " + name)
    return name


def _patch_pools(vm: Qube, pool: str | None, pools: dict[str, str]) -> None:
    """``_patch_pool_config`` (qubes/vm/qubesvm.py): ``pool=`` moves only volumes that are
    writable and not snapshots; ``pool:NAME=`` refuses to move a snapshot away from its
    origin's pool."""
    for vol in vm.volumes.values():
        if pool is not None:
            if vol.rw and not vol.snap_on_start:
                vol.pool = pool
        elif vol.name in pools:
            if vol.snap_on_start:
                raise exc.QubesException(
                    f"Snapshot volume {vol.name} must be in the same pool as its origin "
                    f"({vol.name} volume of template),cannot move to pool {pools[vol.name]} "
                )
            vol.pool = pools[vol.name]


async def _create(call: Call, allow_pool: bool) -> None:
    call.enforce(call.dest.name == "dom0")
    klass = call.endpoint
    template: Qube | None = None
    if call.arg:
        if klass in ("AppVM", "DispVM"):
            template = call.app.domains.get(call.arg)
            if template is None:
                raise exc.QubesVMNotFoundError(call.arg)
        else:
            raise exc.QubesValueError(f"{klass} cannot be based on template")
    kwargs, pool, pools = _parse_create(call, allow_pool)
    if kwargs["name"] in call.app.domains:
        raise exc.QubesValueError(f"VM {kwargs['name']} already exists")
    call.permission(pool=pool, pools=pools, **kwargs)
    if klass == "AdminVM":
        # add_new_vm passes qid= first; AdminVM's qid setter is property.forbidden
        raise exc.QubesPropertyValueError(
            "dom0", "qid", None, "property 'qid' on AdminVM instance cannot be set"
        )
    if klass not in CREATABLE:
        raise exc.QubesNotImplementedError(f"{klass} is not supported by the emulator")
    label = call.app.label_by_name(kwargs["label"])
    vm = lifecycle.create_vm(call.app, klass, kwargs["name"], label, template)
    call.app.add_tag(vm, "created-by-" + call.src.name)
    try:
        _patch_pools(vm, pool, pools)
    except exc.QubesException:
        lifecycle.remove_vm(call.app, vm)
        raise
    if vm.klass != "RemoteVM":  # only a QubesVM has anything on disk
        # a DispVM's private volume starts as its disposable template's, whichever way it is
        # made
        source = vm.get("template", None) if klass == "DispVM" else None
        lifecycle.create_on_disk(call.app, vm, source=source)
    call.save()


@method("admin.vm.Create.{endpoint}", endpoints=VM_CLASSES)
async def vm_create(call: Call) -> None:
    await _create(call, allow_pool=False)


@method("admin.vm.CreateInPool.{endpoint}", endpoints=VM_CLASSES)
async def vm_create_in_pool(call: Call) -> None:
    await _create(call, allow_pool=True)


@method("admin.vm.CreateDisposable")
async def create_disposable(call: Call) -> str | None:
    call.enforce(call.arg in ("", "preload"))
    if call.untrusted_payload not in (b"", b"uuid"):
        raise exc.QubesValueError(
            "Invalid payload for admin.vm.CreateDisposable: expected the empty string or 'uuid'"
        )
    appvm = call.src.get("default_dispvm", None) if call.dest.name == "dom0" else call.dest
    call.permission(dispvm_template=appvm)
    if call.arg == "preload":
        dispvm.preload_start(call.app, appvm)
        return None
    # no usable template (None included): DispVM.can_gen_disposable's QubesException
    new = lifecycle.new_dispvm(call.app, appvm)
    call.app.add_tag(new, "created-by-" + call.src.name)
    call.app.add_tag(new, "disp-created-by-" + call.src.name)
    call.save()
    return "uuid:" + new.uuid if call.untrusted_payload else new.name


@method("admin.vm.Remove", no_payload=True)
async def vm_remove(call: Call) -> None:
    call.enforce(not call.arg)
    call.permission()
    if call.dest.name == "dom0":
        raise exc.QubesVMInUseError("dom0", "'dom0' cannot be removed")
    if call.dest.get("installed_by_rpm", False):
        raise exc.QubesVMInUseError(
            call.dest.name, "VM installed by package manager: " + call.dest.name
        )
    lifecycle.remove_vm(call.app, call.dest)
    call.save()


# --- notes -------------------------------------------------------------------------------


@method("admin.vm.notes.Get", no_payload=True)
async def vm_notes_get(call: Call) -> str:
    call.enforce(call.dest.name != "dom0")
    call.permission()
    remotevm.refuse(call.dest, "get_notes" if call.method.endswith("Get") else "set_notes")
    return call.dest.notes


#: supplementary-plane ranges libqubes-pure allows: CJK ideographs (its test program)
_CJK_SUPPLEMENTARY = (
    (0x20000, 0x2A6DD),
    (0x2A700, 0x2B734),
    (0x2B740, 0x2B81D),
    (0x2B820, 0x2CEA1),
    (0x2CEB0, 0x2EBE0),
    (0x30000, 0x3134A),
)


def _safe_for_display(char: str) -> bool:
    """Stand-in for libqubes-pure's allowlist (``qubes_pure_code_point_safe_for_display``,
    a generated table) from what its test program states: ASCII but controls, letters of
    the scripts (Greek, Cyrillic, CJK, quotation marks) yes; controls, spaces other than
    U+0020, format and private-use characters, emoji and other pictographs (``So``),
    variation selectors, and the supplementary planes outside CJK (cuneiform, emoji) no.
    Tab and newline are admitted by admin.vm.notes.Set itself."""
    if char in "\t\n ":
        return True
    code = ord(char)
    if code >= 0x10000:
        return any(lo <= code <= hi for lo, hi in _CJK_SUPPLEMENTARY)
    category = unicodedata.category(char)
    if 0xFE00 <= code <= 0xFE0F:  # variation selectors (emoji presentation)
        return False
    return category[0] not in ("C", "Z") and category != "So"


@method("admin.vm.notes.Set")
async def vm_notes_set(call: Call) -> None:
    call.enforce(call.dest.name != "dom0")
    call.permission()
    remotevm.refuse(call.dest, "get_notes" if call.method.endswith("Get") else "set_notes")
    if len(call.untrusted_payload) > MAX_NOTES:
        raise exc.ProtocolError(
            f"Maximum note size is {MAX_NOTES} bytes ({len(call.untrusted_payload)} bytes received)"
        )
    try:
        untrusted_text = call.untrusted_payload.decode("utf8")
    except UnicodeDecodeError as err:
        raise exc.ProtocolError("Unable to sanitise qube notes: " + str(err)) from None
    call.dest.notes = "".join(c if _safe_for_display(c) else "_" for c in untrusted_text)
    call.save()
