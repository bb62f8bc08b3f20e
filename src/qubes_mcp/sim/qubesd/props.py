"""Property tables of qubesd R4.3, as data: which properties each class has, their parse
kind, load stage (GetAll orders by ``(load_stage, order, name)``), default and setter.
"""

from __future__ import annotations

from collections.abc import Mapping

from qubes_mcp.sim.qubesd.prop_rules import (
    _app,
    _bootmode,
    _default_ip,
    _default_ip6,
    _default_netvm,
    _default_user,
    _denied_list,
    _dispvm_template,
    _dns,
    _from_template,
    _gateway,
    _gateway6,
    _icon,
    _kernel,
    _kernelopts,
    _kernelopts_default,
    _keyboard_layout,
    _keyboard_layout_setter,
    _mac,
    _maxmem,
    _netvm,
    _non_negative,
    _pool,
    _positive,
    _provides_network,
    _start_time,
    _virt_mode,
    _visible_gateway,
    _visible_gateway6,
    _visible_ip,
    _visible_netmask,
    _xid,
)
from qubes_mcp.sim.qubesd.propdef import PropDef, const, parse_bool, sanitize

__all__ = ["APP_INDEX", "CLASS_INDEX", "PropDef", "listed", "parse_bool", "sanitize"]


# --- tables ------------------------------------------------------------------------------

_COMMON_QUBESVM: tuple[PropDef, ...] = (
    PropDef("name", write_once=True, has_default=False, clone=False),
    PropDef("qid", "int", write_once=True, has_default=False, clone=False),
    PropDef("uuid", "uuid", write_once=True, has_default=False, clone=False),
    PropDef("label", "label", has_default=False),
    PropDef("klass", default=lambda vm: vm.klass, forbidden=True),
    PropDef("icon", default=_icon, forbidden=True),
    PropDef("autostart", "bool", default=const(False)),
    PropDef("backup_timestamp", "int", default=const(None)),
    PropDef("debug", "bool", default=const(False)),
    PropDef(
        "default_user",
        default=_from_template("default_user", const("user")),
        setter=_default_user,
    ),
    PropDef("devices_denied", default=const(""), setter=_denied_list),
    PropDef("dns", default=_dns, forbidden=True),
    PropDef("gateway", default=_gateway, forbidden=True),
    PropDef("gateway6", default=_gateway6, forbidden=True),
    PropDef("include_in_backups", "bool", default=const(True)),
    PropDef("installed_by_rpm", "bool", default=const(False)),
    PropDef("ip", "ipv4", default=_default_ip),
    PropDef("ip6", "ipv6", default=_default_ip6),
    PropDef("kernel", default=_from_template("kernel", _app("default_kernel")), setter=_kernel),
    PropDef("keyboard_layout", default=_keyboard_layout, setter=_keyboard_layout_setter),
    PropDef("mac", default=const("00:16:3e:5e:6c:00"), setter=_mac),
    PropDef("maxmem", "int", default=_maxmem, setter=_non_negative),
    PropDef("memory", "int", default=_from_template("memory", const(400)), setter=_positive),
    PropDef("provides_network", "bool", default=const(False), setter=_provides_network),
    PropDef(
        "qrexec_timeout",
        "int",
        default=_from_template("qrexec_timeout", _app("default_qrexec_timeout")),
        setter=_positive,
    ),
    PropDef(
        "shutdown_timeout",
        "int",
        default=_from_template("shutdown_timeout", _app("default_shutdown_timeout")),
        setter=_positive,
    ),
    PropDef("start_time", default=_start_time, forbidden=True),
    PropDef("stubdom_mem", "int", default=const(None), setter=_positive),
    PropDef("stubdom_uuid", default=const(""), forbidden=True),
    PropDef("stubdom_xid", "int", default=const(-1), forbidden=True),
    PropDef("updateable", "bool", default=lambda vm: not vm.has_prop("template"), forbidden=True),
    PropDef("vcpus", "int", default=_from_template("vcpus", const(2)), setter=_positive),
    PropDef(
        "virt_mode",
        default=_from_template("virt_mode", const("pvh")),
        setter=_virt_mode,
    ),
    PropDef("visible_gateway", default=_visible_gateway, forbidden=True),
    PropDef("visible_gateway6", default=_visible_gateway6, forbidden=True),
    PropDef("visible_ip", default=_visible_ip, forbidden=True),
    PropDef("visible_ip6", default=lambda vm: vm.get("ip6"), forbidden=True),
    PropDef("visible_netmask", default=_visible_netmask, forbidden=True),
    PropDef("xid", "int", default=_xid, forbidden=True),
    PropDef("audiovm", "vm", 4, default=_app("default_audiovm")),
    PropDef("bootmode", stage=4, default=_bootmode),
    PropDef("default_dispvm", "vm", 4, default=_app("default_dispvm")),
    PropDef("guivm", "vm", 4, default=_app("default_guivm")),
    PropDef("kernelopts", stage=4, default=_kernelopts_default, setter=_kernelopts),
    PropDef(
        "management_dispvm",
        "vm",
        4,
        default=_from_template("management_dispvm", _app("management_dispvm")),
    ),
    PropDef("netvm", "vm", 4, default=_app("default_netvm"), setter=_netvm),
)

_TEMPLATE_FOR_DISPVMS = PropDef("template_for_dispvms", "bool", default=const(False))
_APPVM_TEMPLATE = PropDef(
    "template", "vm", 4, has_default=False, vmclass=("TemplateVM",), allow_none=False
)


def _replace(props: tuple[PropDef, ...], *new: PropDef) -> tuple[PropDef, ...]:
    by_name = {p.name: p for p in props}
    for p in new:
        by_name[p.name] = p
    return tuple(by_name.values())


CLASS_PROPS: dict[str, tuple[PropDef, ...]] = {
    "AppVM": _replace(_COMMON_QUBESVM, _TEMPLATE_FOR_DISPVMS, _APPVM_TEMPLATE),
    "StandaloneVM": _replace(_COMMON_QUBESVM, _TEMPLATE_FOR_DISPVMS),
    "TemplateVM": _replace(
        _COMMON_QUBESVM,
        PropDef("netvm", "vm", 4, default=const(None), setter=_netvm),
        PropDef("appvm_default_bootmode", stage=4, default=_bootmode),
    ),
    "DispVM": _replace(
        _COMMON_QUBESVM,
        PropDef("auto_cleanup", "bool", default=const(False)),
        PropDef("dispid", "int", write_once=True, has_default=False, clone=False),
        PropDef("is_preload", "bool", default=const(False), forbidden=True),
        PropDef("include_in_backups", "bool", default=lambda vm: not vm.get("auto_cleanup")),
        PropDef("default_dispvm", "vm", 4, default=lambda vm: vm.get("template")),
        PropDef("template", "vm", 4, has_default=False, setter=_dispvm_template, allow_none=False),
    ),
    # qubes/vm/remotevm.py: BaseVM's four, the two stateless ones, and the relay's
    "RemoteVM": (
        PropDef("name", write_once=True, has_default=False, clone=False),
        PropDef("qid", "int", write_once=True, has_default=False, clone=False),
        PropDef("uuid", "uuid", write_once=True, has_default=False, clone=False),
        PropDef("label", "label", has_default=False),
        PropDef("klass", default=lambda vm: vm.klass, forbidden=True),
        PropDef("icon", default=_icon, forbidden=True),
        PropDef("include_in_backups", "bool", default=const(False)),
        PropDef("remote_name", default=const(None)),
        PropDef("transport_rpc", default=const(None)),
        PropDef("relayvm", "vm", 4, default=const(None)),
    ),
    "AdminVM": (
        PropDef("devices_denied", default=const(""), setter=_denied_list),
        PropDef("icon", default=_icon, forbidden=True),
        PropDef("include_in_backups", "bool", default=const(True)),
        PropDef("keyboard_layout", default=const("us++"), setter=_keyboard_layout_setter),
        PropDef("klass", default=const("AdminVM"), forbidden=True),
        PropDef("label", "label", has_default=False),
        PropDef("name", default=const("dom0"), forbidden=True),
        PropDef("qid", "int", default=const(0), forbidden=True),
        PropDef("updateable", "bool", default=const(True), forbidden=True),
        PropDef("uuid", default=const("00000000-0000-0000-0000-000000000000"), forbidden=True),
        PropDef("default_dispvm", "vm", 4, default=_app("default_dispvm")),
    ),
}

_POOL_DEFAULT = "varlibqubes"

APP_PROPS: tuple[PropDef, ...] = (
    PropDef("check_updates_vm", "bool", 3, default=const(True)),
    PropDef("clockvm", "vm", 3, default=const(None)),
    PropDef("default_audiovm", "vm", 3, default=lambda app: app.domains.get("dom0")),
    PropDef("default_dispvm", "vm", 3, default=const(None)),
    PropDef("default_guivm", "vm", 3, default=lambda app: app.domains.get("dom0")),
    PropDef("default_kernel", stage=3, has_default=False),
    PropDef("default_netvm", "vm", 3, default=const(None), setter=_default_netvm),
    PropDef("default_pool", stage=3, default=const(_POOL_DEFAULT), setter=_pool),
    PropDef(
        "default_pool_kernel", stage=3, default=lambda app: app.get("default_pool"), setter=_pool
    ),
    PropDef(
        "default_pool_private", stage=3, default=lambda app: app.get("default_pool"), setter=_pool
    ),
    PropDef(
        "default_pool_root", stage=3, default=lambda app: app.get("default_pool"), setter=_pool
    ),
    PropDef(
        "default_pool_volatile", stage=3, default=lambda app: app.get("default_pool"), setter=_pool
    ),
    PropDef("default_qrexec_timeout", "int", 3, default=const(60)),
    PropDef("default_shutdown_timeout", "int", 3, default=const(60)),
    PropDef("default_template", "vm", 3, has_default=False, vmclass=("TemplateVM",)),
    PropDef("management_dispvm", "vm", 3, default=const(None)),
    PropDef("stats_interval", "int", 3, default=const(3)),
    PropDef("updatevm", "vm", 3, default=const(None)),
)

CLASS_INDEX: dict[str, dict[str, PropDef]] = {
    klass: {p.name: p for p in props} for klass, props in CLASS_PROPS.items()
}
APP_INDEX: dict[str, PropDef] = {p.name: p for p in APP_PROPS}


def listed(props: Mapping[str, PropDef]) -> list[PropDef]:
    """Property order of ``property.List`` and ``GetAll``: ``(load_stage, order, name)``."""
    return sorted(props.values(), key=PropDef.sort_key)
