"""Setters and defaults of qubesd R4.3 properties (``qubes/vm/qubesvm.py``, ``mix/net.py``,
``qubes/app.py``), as functions of the holder (a :class:`~.vm.Qube` or the app, as ``Any``:
they reach across the model the way the Qubes lambdas do).
"""

from __future__ import annotations

import re
import string
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import names
from qubes_mcp.sim.qubesd.propdef import Default, PropDef, const

#: Host RAM the emulator pretends to have (MiB); maxmem defaults are capped at half of it.
HOST_MEMORY_MIB = 16384


# --- setters -----------------------------------------------------------------------------


def _positive(holder: Any, prop: PropDef, value: Any) -> object:
    if int(value) <= 0:
        raise exc.QubesPropertyValueError(
            repr(holder), prop.name, value, f"{prop.name} must be positive"
        )
    return int(value)


def _non_negative(holder: Any, prop: PropDef, value: Any) -> object:
    if int(value) < 0:
        raise exc.QubesPropertyValueError(
            repr(holder), prop.name, value, f"{prop.name} must be positive or zero"
        )
    return int(value)


def _virt_mode(holder: Any, prop: PropDef, value: Any) -> object:
    if str(value).lower() not in ("hvm", "pv", "pvh"):
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            "Invalid virtualization mode, supported values: hvm, pv, pvh",
        )
    return str(value).lower()


def _default_user(holder: Any, prop: PropDef, value: Any) -> object:
    if not all(c in names.USERNAME_CHARS for c in str(value)):
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            "Username can contain only those characters: " + names.USERNAME_CHARS,
        )
    return value


_KBD_VARIANT = re.compile(r"\A[a-zA-Z0-9-_]*\Z")
_KBD_OPTIONS = re.compile(r"\A[a-zA-Z0-9-_:,]*\Z")


def _keyboard_layout_setter(holder: Any, prop: PropDef, value: Any) -> object:
    """``_setter_kbd_layout`` (qubesvm.py:188-218): ASCII ``layout+variant+options``."""
    text = str(value)

    def refuse(why: str) -> exc.QubesPropertyValueError:
        return exc.QubesPropertyValueError(repr(holder), prop.name, value, why)

    if not text.isascii():
        raise refuse("Keyboard layouts must be ASCII")
    parts = text.split("+")
    if len(parts) != 3:
        raise refuse("invalid number of keyboard layout parameters")
    layout, variant, options = parts
    if not layout.isalpha():
        raise refuse("Invalid keyboard layout provided")
    if not _KBD_VARIANT.match(variant):
        raise refuse("Invalid layout variant provided")
    if not _KBD_OPTIONS.match(options):
        raise refuse("Invalid layout options provided")
    return text


def _kernel(holder: Any, prop: PropDef, value: Any) -> object:
    """``_setter_kernel`` (qubesvm.py:69-81): empty is ``""``; no ``/`` in a name."""
    if not value:
        return ""
    if "/" in str(value):
        raise exc.QubesPropertyValueError(
            repr(holder), prop.name, value, "Kernel name cannot contain '/'"
        )
    return str(value)


def _kernelopts(holder: Any, prop: PropDef, value: Any) -> object:
    if not value:
        return ""
    if len(str(value)) > 512:
        raise exc.QubesPropertyValueError(
            repr(holder), prop.name, value, "Kernelopts value too long (512 chars max)"
        )
    return str(value)


def _mac(holder: Any, prop: PropDef, value: Any) -> object:
    parts = str(value).split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in string.hexdigits for c in p) for p in parts
    ):
        raise ValueError("Invalid MAC address value")
    return str(value).lower()


_DENIED_RE = re.compile(r"^([bump\*][0123456789abcdef\*]{6})*$")


def _denied_list(holder: Any, prop: PropDef, value: Any) -> object:
    """``_setter_denied_list``: 7-character codes, deduplicated and sorted."""
    if not value:
        return ""
    text = str(value)
    if len(text) % 7 != 0:
        raise exc.QubesValueError(
            f"Invalid length of interfaces={text!r} (is {len(text)}, expected multiple of 7)"
        )
    text = "".join(sorted({text[i : i + 7] for i in range(0, len(text), 7)}))
    if not _DENIED_RE.fullmatch(text):
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            "Interface code list should be in the form chhhhhhchhhhhh...,"
            'where c is one of "b", "u", "m", "p", "*" '
            'and h is a hexdigit or "*".',
        )
    return text


def _provides_network(holder: Any, prop: PropDef, value: Any) -> object:
    if not value and any(holder.app.connected_vms(holder)):
        raise exc.QubesValueError(
            "The qube is still used by other qubes, change theirs 'netvm' first"
        )
    return bool(value)


def _netvm(holder: Any, prop: PropDef, value: Any) -> object:
    if value is None:
        return None
    if not value.get("provides_network"):
        raise exc.QubesValueError(f"The {value.name} qube does not provide network")
    if value is holder or value in holder.app.vms_connected_to(holder):
        raise exc.QubesValueError("Loops in network are unsupported")
    return value


def _dispvm_template(holder: Any, prop: PropDef, value: Any) -> object:
    if not value.get("template_for_dispvms", False):
        raise exc.QubesPropertyValueError(
            repr(holder),
            prop.name,
            value,
            "template for disposable must have template_for_dispvms=True",
        )
    return value


def _pool(holder: Any, prop: PropDef, value: Any) -> object:
    if value not in holder.pools:
        raise exc.QubesPropertyValueError(repr(holder), prop.name, value, "No such storage pool")
    return value


def _default_netvm(holder: Any, prop: PropDef, value: Any) -> object:
    if value is None:
        return None
    for vm in holder.domains.values():
        if not vm.has_prop("netvm") or not vm.is_default("netvm"):
            continue
        if value is vm or value in holder.vms_connected_to(vm):
            raise exc.QubesPropertyValueError(
                repr(holder), prop.name, value, f"Network loop on '{vm.name}'"
            )
    return value


# --- defaults ----------------------------------------------------------------------------


def _from_template(name: str, fallback: Default) -> Default:
    def default(vm: Any) -> object:
        tpl = vm.template_or_none()
        if tpl is not None and tpl.has_prop(name):
            return tpl.get(name)
        return fallback(vm)

    return default


def _app(name: str) -> Default:
    return lambda vm: vm.app.get(name)


def _is_networked(vm: Any) -> bool:
    return bool(vm.get("provides_network")) or vm.get("netvm") is not None


def vmid_to_ipv4(prefix: str, vmid: int) -> str:
    """``qubes/vm/mix/net.py`` ``vmid_to_ipv4``: skip .0 and .255 above 254."""
    if vmid < 255:
        return f"{prefix}.{(vmid >> 8) & 0xFF}.{vmid & 0xFF}"
    vmid -= 1
    return f"{prefix}.{vmid // 254}.{(vmid % 254) + 1}"


def _ip_for(vm: Any) -> str:
    if vm.klass == "DispVM":
        return vmid_to_ipv4("10.138", vm.get("dispid"))
    return vmid_to_ipv4("10.137", vm.qid)


def _default_ip(vm: Any) -> object:
    return _ip_for(vm) if _is_networked(vm) else None


def _default_ip6(vm: Any) -> object:
    if not _is_networked(vm) or not vm.check_feature("netvm", "ipv6", False):
        return None
    if vm.klass == "DispVM":
        return f"fd09:24ef:4179::a8a:{vm.get('dispid'):x}"
    return f"fd09:24ef:4179::a89:{vm.qid:x}"


def _visible_ip(vm: Any) -> object:
    return vm.check_feature("template", "net.fake-ip", None) or vm.get("ip")


def _visible_gateway(vm: Any) -> object:
    netvm = vm.get("netvm")
    return vm.check_feature("template", "net.fake-gateway", None) or (
        netvm.get("gateway") if netvm is not None else None
    )


def _visible_gateway6(vm: Any) -> object:
    netvm = vm.get("netvm")
    if vm.check_feature("netvm", "ipv6", False) and netvm is not None:
        return netvm.get("gateway6")
    return None


def _visible_netmask(vm: Any) -> object:
    netvm = vm.get("netvm")
    return vm.check_feature("template", "net.fake-netmask", None) or (
        ("255.255.255.255" if _is_networked(netvm) else None) if netvm is not None else None
    )


def _gateway(vm: Any) -> object:
    return vm.get("visible_ip") if vm.get("provides_network") else None


def _gateway6(vm: Any) -> object:
    if vm.check_feature("netvm", "ipv6", False) and vm.get("provides_network"):
        return vm.get("visible_ip6")
    return None


def _dns(vm: Any) -> object:
    if vm.get("netvm") is not None or vm.get("provides_network"):
        return "10.139.1.1 10.139.1.2"
    return None


def _icon(vm: Any) -> object:
    if vm.klass == "AdminVM":
        return "adminvm-black"  # adminvm.py: a constant, whatever the label
    label = vm.label_or_none()
    if label is None:
        raise AttributeError("icon")
    if vm.klass == "AppVM" and vm.get("template_for_dispvms"):
        return "templatevm-" + label.name
    prefix = {
        "TemplateVM": "templatevm-",
        "DispVM": "dispvm-",
        "StandaloneVM": "standalonevm-",
        "RemoteVM": "remotevm-",
    }
    if vm.klass == "TemplateVM":
        return prefix["TemplateVM"] + label.name
    if vm.features.get("servicevm"):
        return "servicevm-" + label.name
    return prefix.get(vm.klass, "appvm-") + label.name


def _balancing_possible(vm: Any) -> bool:
    """``is_memory_balancing_possible`` (qubesvm.py:1965-1995; no qube has PCI devices): an
    HVM qube balances only if it announces qrexec and, when it announces any service,
    ``meminfo-writer``."""
    if vm.get("virt_mode") != "hvm":
        return True
    features: set[str] = set(vm.features)
    tpl = vm.template_or_none()
    while tpl is not None:
        features.update(tpl.features)
        tpl = tpl.template_or_none()
    services = any(f.startswith("supported-service.") for f in features)
    if not vm.check_feature("template", "qrexec", ""):
        return False
    return not services or bool(
        vm.check_feature("template", "supported-service.meminfo-writer", "")
    )


def _maxmem(vm: Any) -> object:
    if not _balancing_possible(vm):
        return 0
    cap = vm.get("memory") * 10 if vm.features.get("os") == "Linux" else 4000
    cap = min(cap, HOST_MEMORY_MIB // 2)
    return _from_template("maxmem", const(cap))(vm)


def _start_time(vm: Any) -> object:
    return vm.start_time


def _xid(vm: Any) -> object:
    return vm.xid


def _keyboard_layout(vm: Any) -> object:
    guivm = vm.get("guivm")
    return guivm.get("keyboard_layout") if guivm is not None else "us++"


def _kernelopts_default(vm: Any) -> object:
    if not vm.get("kernel"):
        return ""
    return _from_template("kernelopts", const("swiotlb=2048"))(vm)


def _bootmode(vm: Any) -> object:
    return "default"
