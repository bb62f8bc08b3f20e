"""Property writes with R4.3 semantics: write-once and stateless checks, VM and label
resolution, setters, the vetoes R4.3 raises from ``property-pre-set``/``pre-reset`` handlers,
and the full event sequence (``property-pre-set:*`` … ``property-del:*``).

Functions of :class:`~.app.QubesApp` (which exposes ``set_prop``/``reset_prop``), kept
apart so the app module stays small.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.vm import Label, Qube

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import QubesApp

log = logging.getLogger("qubes_mcp.sim.qubesd")

DVM_IN_USE = (
    "Cannot change template_for_dispvms to False while there are some disposables "
    "based on this disposable template"
)


def set_prop(app: QubesApp, holder: Qube | QubesApp, name: str, value: object) -> None:
    """``setattr`` with R4.3 semantics; ``value`` is what ``sanitize`` returned."""
    prop = holder.defs[name]
    if prop.write_once and name in holder.props:
        raise AttributeError(f"property {name!r} is write-once and already set")
    if prop.forbidden:
        klass = holder.klass if isinstance(holder, Qube) else "Qubes"
        raise exc.QubesPropertyValueError(
            repr(holder), name, value, f"property {name!r} on {klass} instance cannot be set"
        )
    typed = _resolve(app, holder, prop, value)
    if prop.setter is not None:
        typed = prop.setter(holder, prop, typed)
    subject = holder if isinstance(holder, Qube) else None
    kw: dict[str, object] = {"name": name, "newvalue": typed}
    with contextlib.suppress(AttributeError):
        kw["oldvalue"] = holder.get(name)
    app.emit(subject, "property-pre-set:" + name, kw, pre=True)
    _pre_set_checks(app, holder, name, typed)
    holder.props[name] = _store(typed)
    app.emit(subject, "property-set:" + name, kw)
    if isinstance(holder, Qube) and name == "netvm":
        _after_netvm_change(app, holder, typed)


def _after_netvm_change(app: QubesApp, vm: Qube, netvm: object) -> None:
    """``on_property_set_netvm``: a running qube connects to its new netvm now."""
    if isinstance(netvm, Qube) and vm.is_running():
        app.fire(netvm, "net-domain-connect", vm=vm)


def reset_prop(app: QubesApp, holder: Qube | QubesApp, name: str) -> None:
    """``delattr``: back to the default, with the four reset events."""
    prop = holder.defs[name]
    if prop.write_once and name in holder.props:
        raise AttributeError(f"property {name!r} is write-once and already set")
    subject = holder if isinstance(holder, Qube) else None
    kw: dict[str, object] = {"name": name}
    with contextlib.suppress(AttributeError):
        kw["oldvalue"] = holder.get(name)
    app.emit(subject, "property-pre-reset:" + name, kw, pre=True)
    if isinstance(holder, Qube) and name == "template" and holder.klass == "AppVM":
        default_template = app.get("default_template", None)
        if default_template is not None:
            raise exc.QubesValueError(
                "Cannot unset template. You can set it to the current default "
                f"({default_template.name}) instead"
            )
        raise exc.QubesValueError("Cannot unset template")
    netvm_change: dict[str, object] | None = None
    if isinstance(holder, Qube) and name == "netvm":
        # NetVMMixin.on_property_pre_reset_netvm: the default must pass the netvm
        # setter, and a change is announced as a netvm pre-set (with its checks)
        newvalue = prop.default(holder) if prop.default else None
        newvalue = app.domains.get(newvalue) if isinstance(newvalue, str) else newvalue
        if prop.setter is not None:
            prop.setter(holder, prop, newvalue)
        if newvalue is not kw.get("oldvalue"):
            netvm_change = {**kw, "newvalue": newvalue}
            app.emit(subject, "property-pre-set:netvm", netvm_change, pre=True)
            _pre_set_checks(app, holder, name, newvalue)
    app.emit(subject, "property-pre-del:" + name, kw, pre=True)
    holder.props.pop(name, None)
    app.emit(subject, "property-reset:" + name, kw)
    if netvm_change is not None and subject is not None:
        app.emit(subject, "property-set:netvm", netvm_change)
        _after_netvm_change(app, subject, netvm_change["newvalue"])
    app.emit(subject, "property-del:" + name, kw)


def default_netvm_pre_set(app: QubesApp, kw: dict[str, object]) -> None:
    """app.py:1729-1744: every qube on the default netvm hears ``property-pre-set:netvm``
    (with the app's old and new values), and its checks run."""
    for vm in list(app.domains.values()):
        if vm.has_prop("netvm") and vm.is_default("netvm"):
            app.emit(vm, "property-pre-set:netvm", {**kw, "name": "netvm"}, pre=True)
            _pre_set_checks(app, vm, "netvm", kw.get("newvalue"))


def default_netvm_set(app: QubesApp, kw: dict[str, object]) -> None:
    """app.py:1746-1757 fires ``property-reset:netvm`` on each of those qubes; net.py:585-597
    turns a change into ``property-set:netvm``, whose handler (net.py:634-655) reloads the
    new netvm's connected IPs — which dom0 cannot do (AttributeError: the new default is
    stored, the reply is empty and the remaining qubes hear nothing)."""
    oldvalue = kw.get("oldvalue")
    for vm in list(app.domains.values()):
        if not (vm.has_prop("netvm") and vm.is_default("netvm")):
            continue
        app.emit(vm, "property-reset:netvm", {"name": "netvm", "oldvalue": oldvalue})
        newvalue = vm.get("netvm", None)
        if newvalue is oldvalue:
            continue
        # net.py:640-647 reloads the old and the new netvm's connected IPs; dom0 has no
        # such method (also when dom0 is the old default, after a half-applied set)
        if any(isinstance(v, Qube) and v.klass == "AdminVM" for v in (newvalue, oldvalue)):
            raise AttributeError("'AdminVM' object has no attribute 'reload_connected_ips'")
        app.emit(
            vm, "property-set:netvm", {"name": "netvm", "newvalue": newvalue, "oldvalue": oldvalue}
        )
        _after_netvm_change(app, vm, newvalue)


def _resolve(app: QubesApp, holder: Qube | QubesApp, prop: pdefs.PropDef, value: object) -> object:
    if prop.kind == "label":
        return app.label_by_name(str(value))
    if prop.kind != "vm":
        return value
    if value in ("", None):
        if prop.allow_none:
            return None
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            None,
            f"Invalid value None for property {prop.name!r} of {holder!r}",
        )
    vm = app.domains.get(str(value))
    if vm is None:
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            f"Can't set {prop.name} to non-existing qube {value}",
        )
    vmclass = prop.vmclass
    if vmclass is None and vm.klass == "RemoteVM":
        # VMProperty's default vmclass is LocalVM, which a RemoteVM is not
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            f"wrong VM class: domains[{vm.name!r}] is of type RemoteVM and not LocalVM",
        )
    if vmclass is not None and vm.klass not in vmclass:
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            f"wrong VM class: domains[{vm.name!r}] is of type {vm.klass} and not {vmclass[0]}",
        )
    return vm


def _pre_set_checks(app: QubesApp, holder: Qube | QubesApp, name: str, value: object) -> None:
    """Vetoes that R4.3 raises from ``property-pre-set:*`` handlers."""
    if not isinstance(holder, Qube):
        return
    if (
        name == "netvm"
        and isinstance(value, Qube)
        and holder.is_running()
        and not value.is_running()
    ):
        raise exc.QubesVMNotStartedError(
            value.name, f"Cannot dynamically attach to stopped qube {value.name}"
        )
    if name == "template" and holder.klass == "AppVM" and not holder.is_halted():
        raise exc.QubesVMNotHaltedError(holder.name, "Cannot change template while qube is running")
    if name == "template_for_dispvms" and not value and holder.get(name, False):
        users = [
            vm.name
            for vm in app.domains.values()
            if vm.klass == "DispVM" and vm.get("template", None) is holder
        ]
        if users:
            log.error("%s: %s", DVM_IN_USE, ", ".join(users))
            # R4.3 passes a tuple as the message; its repr is what the client sees
            raise exc.QubesVMInUseError(holder.name, str((DVM_IN_USE,)))


def _store(value: object) -> object:
    if isinstance(value, (Qube, Label)):
        return value.name
    return value
