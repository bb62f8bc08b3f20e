"""``admin.vm.property.*`` and ``admin.property.*`` (R4.3 ``qubes/api/admin.py``)."""

from __future__ import annotations

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.api import Call, method
from qubes_mcp.sim.qubesd.app import QubesApp
from qubes_mcp.sim.qubesd.vm import Qube

Holder = Qube | QubesApp


def _global(call: Call) -> QubesApp:
    call.enforce(call.dest.name == "dom0")
    return call.app


def _known(call: Call, holder: Holder) -> pdefs.PropDef:
    prop = holder.defs.get(call.arg)
    if prop is None:
        raise exc.QubesNoSuchPropertyError(holder.name, call.arg)
    return prop


def serialize(holder: Holder, prop: pdefs.PropDef) -> str:
    """``_serialize_property``: ``default=<bool> type=<t> <value>``."""
    try:
        value = holder.get(prop.name)
    except AttributeError:
        return f"default=True type={prop.wire_type} "
    text = "" if value is None else str(value)
    return f"default={holder.is_default(prop.name)} type={prop.wire_type} {text}"


def _list(call: Call, holder: Holder) -> str:
    call.enforce(not call.arg)
    props = call.filtered(pdefs.listed(holder.defs))
    return "".join(f"{p.name}\n" for p in props)


def _get(call: Call, holder: Holder) -> str:
    prop = _known(call, holder)
    call.permission()
    return serialize(holder, prop)


def _get_all(call: Call, holder: Holder) -> str:
    call.enforce(not call.arg)
    props = call.filtered(pdefs.listed(holder.defs))
    return "".join(
        "{} {}\n".format(p.name, serialize(holder, p).replace("\\", "\\\\").replace("\n", "\\n"))
        for p in props
    )


def _get_default(call: Call, holder: Holder) -> str | None:
    prop = _known(call, holder)
    call.permission()
    if not prop.has_default or prop.default is None:
        return None
    try:
        value = prop.default(holder)
    except AttributeError:
        return None
    if prop.kind == "vm" and isinstance(value, str):
        value = call.app.domains.get(value)
    return f"type={prop.wire_type} {'' if value is None else value}"


def _set(call: Call, holder: Holder) -> None:
    prop = _known(call, holder)
    newvalue = pdefs.sanitize(prop, call.untrusted_payload)
    call.permission(newvalue=newvalue)
    call.app.set_prop(holder, prop.name, newvalue)
    call.save()


def _reset(call: Call, holder: Holder) -> None:
    prop = _known(call, holder)
    call.permission()
    call.app.reset_prop(holder, prop.name)
    call.save()


@method("admin.vm.property.List", no_payload=True)
async def vm_property_list(call: Call) -> str:
    return _list(call, call.dest)


@method("admin.property.List", no_payload=True)
async def property_list(call: Call) -> str:
    return _list(call, _global(call))


@method("admin.vm.property.Get", no_payload=True)
async def vm_property_get(call: Call) -> str:
    return _get(call, call.dest)


@method("admin.property.Get", no_payload=True)
async def property_get(call: Call) -> str:
    return _get(call, _global(call))


@method("admin.vm.property.GetAll", no_payload=True)
async def vm_property_get_all(call: Call) -> str:
    return _get_all(call, call.dest)


@method("admin.property.GetAll", no_payload=True)
async def property_get_all(call: Call) -> str:
    return _get_all(call, _global(call))


@method("admin.vm.property.GetDefault", no_payload=True)
async def vm_property_get_default(call: Call) -> str | None:
    return _get_default(call, call.dest)


@method("admin.property.GetDefault", no_payload=True)
async def property_get_default(call: Call) -> str | None:
    return _get_default(call, _global(call))


@method("admin.vm.property.Set")
async def vm_property_set(call: Call) -> None:
    _set(call, call.dest)


@method("admin.property.Set")
async def property_set(call: Call) -> None:
    _set(call, _global(call))


@method("admin.vm.property.Reset", no_payload=True)
async def vm_property_reset(call: Call) -> None:
    _reset(call, call.dest)


@method("admin.property.Reset", no_payload=True)
async def property_reset(call: Call) -> None:
    _reset(call, _global(call))


_KIND_WORDS = {
    "vm": "a qube (or none)",
    "int": "an integer",
    "bool": "a boolean",
    "label": "a label name",
    "uuid": "a UUID",
    "ipv4": "an IPv4 address",
    "ipv6": "an IPv6 address",
    "str": "a string",
}


def _help(call: Call, holder: Holder) -> str:
    """``_property_help``: R4.3 returns the property's docstring (RST stripped). The emulator
    has no docstrings of its own to give, so it describes the property from its definition:
    same checks and errors, different words (docs/fidelity.md)."""
    prop = _known(call, holder)
    call.permission()
    notes = []
    if prop.write_once:
        notes.append("it can be set only once")
    if prop.forbidden:
        notes.append("it cannot be set through the Admin API")
    if prop.kind == "vm" and not prop.allow_none:
        notes.append("it cannot be none")
    tail = f" ({'; '.join(notes)})" if notes else ""
    return f"{prop.name}: {_KIND_WORDS.get(prop.kind, 'a value')}{tail}."


@method("admin.vm.property.Help", no_payload=True)
async def vm_property_help(call: Call) -> str:
    return _help(call, call.dest)


@method("admin.property.Help", no_payload=True)
async def property_help(call: Call) -> str:
    return _help(call, _global(call))
