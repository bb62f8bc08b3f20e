"""The checks of ``admin.vm.device.block.Attach``, in the order R4.3 qubesd makes them.

1. Parse the argument (``DeviceRef.from_qarg``); an unknown backend qube is a ``KeyError``.
2. Load the full device info only when port and device id are both given and match a
   device the (running) backend exposes (``load_device_info``).
3. Parse the payload as a ``DeviceAssignment``; any problem becomes ``ProtocolError``.
4. ``devices_denied`` of the frontend (``ext/admin.py`` ``on_device_attach``; manual mode only).
5. ``DeviceCollection.attach``: the frontend must run; exactly one real device must match;
   not already attached to this frontend.
6. ``ext/block.py`` pre-attach: options, read-only devices, attached elsewhere, frontend node.
7. What libvirt/libxl would refuse (self-attachment, dom0 as frontend, a node in use).
"""

from __future__ import annotations

import re
from typing import Protocol

from qubes_mcp.sim import exc
from qubes_mcp.sim.device_model import (
    DEVCLASS,
    FRONTENDS,
    SYSTEM_DISKS,
    Attachment,
    BlockDeviceSpec,
    LibvirtError,
    QubeStates,
)
from qubes_mcp.sim.device_wire import ASSIGNMENT_MODES, UNKNOWN_DEVICE_ID, DeviceRef, unpack

_BLOCK_INTERFACE = "b******"
_FRONTEND_DEV_RE = re.compile(r"\A(xvd|sd)[a-z]{1,3}\Z")
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


class DeviceView(Protocol):
    """What the checks read from ``sim.devices.BlockDevices``."""

    qubes: QubeStates

    def visible(self, backend: str) -> dict[str, BlockDeviceSpec]: ...

    def device_id(self, backend: str, port_id: str) -> str: ...

    def attached_to(self, frontend: str) -> list[Attachment]: ...

    def attachment_of(self, backend: str, port_id: str) -> Attachment | None: ...


def check_attach(
    devs: DeviceView,
    frontend: str,
    untrusted_arg: str,
    untrusted_payload: bytes,
    devices_denied: str,
) -> tuple[str, BlockDeviceSpec, dict[str, str]]:
    """Validate an Attach request; return ``(backend, device, options)`` to record.

    Raises:
        KeyError, ValueError: Unknown backend qube / argument without ``+`` (not reported).
        ProtocolError: Bad payload or no single matching device (not reported).
        PermissionDenied: The device's interface is on ``devices_denied`` (not reported).
        QubesVMNotRunningError: The frontend is not running.
        DeviceAlreadyAttached: Attached to this or another qube.
        QubesValueError: Bad option, or read-write attachment of a read-only device.
        LibvirtError: What libxl would refuse (not reported).
    """
    ref = DeviceRef.from_qarg(untrusted_arg)
    if ref.backend != "*" and not devs.qubes.exists(ref.backend):
        raise KeyError(ref.backend)
    expected_id = ref.device_id
    full_info = False
    if "*" not in (ref.backend, ref.port_id, ref.device_id):
        real = devs.visible(ref.backend).get(ref.port_id)
        if real is not None and devs.device_id(ref.backend, ref.port_id) == ref.device_id:
            full_info = True
    mode, device_id, options, _ = parse_assignment(devs, ref, expected_id, untrusted_payload)
    # --- payload is trusted from here on (charset- and key-checked).

    if mode == "manual" and devices_denied:
        _check_denied(devices_denied, full_info)

    if not devs.qubes.is_running(frontend):
        raise exc.QubesVMNotRunningError(
            frontend, "VM not running, cannot attach device, do you mean `assign`?"
        )
    backend, spec = _resolve_single(devs, ref, device_id)
    device_str = f"{backend}:{spec.port_id}:{devs.device_id(backend, spec.port_id)}"
    if any((a.backend, a.port_id) == (backend, spec.port_id) for a in devs.attached_to(frontend)):
        raise exc.DeviceAlreadyAttached(
            f"device {device_str} of class {DEVCLASS} already attached to {frontend}"
        )
    options = check_options(options, spec)
    elsewhere = devs.attachment_of(backend, spec.port_id)
    if elsewhere is not None:
        raise exc.DeviceAlreadyAttached(
            f"Device {device_str} already attached to {elsewhere.frontend}"
        )
    check_libvirt(devs, frontend, backend, options)
    return backend, spec, options


def parse_assignment(
    devs: DeviceView, ref: DeviceRef, expected_id: str, untrusted_payload: bytes
) -> tuple[str, str, dict[str, str], str | None]:
    """``DeviceAssignment.deserialize`` against the argument.

    Returns:
        ``(mode, device id, options, frontend_domain or None)``.

    Raises:
        ProtocolError: For every problem, as qubesd wraps them all.
    """
    try:
        return _parse_assignment(devs, ref, expected_id, untrusted_payload)
    except (ValueError, KeyError, TypeError) as err:
        raise exc.ProtocolError(str(err)) from err


def _parse_assignment(
    devs: DeviceView, ref: DeviceRef, expected_id: str, untrusted_payload: bytes
) -> tuple[str, str, dict[str, str], str | None]:
    properties, options = unpack(untrusted_payload)
    if properties.get("backend_domain", ref.backend) != ref.backend:
        raise exc.UnexpectedDeviceProperty(
            f"Got device exposed by {properties['backend_domain']}"
            f"when expected devices from {ref.backend}."
        )
    if properties.get("port_id", ref.port_id) != ref.port_id:
        raise exc.UnexpectedDeviceProperty(
            f"Got device from port: {properties['port_id']} when expected port: {ref.port_id}."
        )
    if properties.get("devclass", DEVCLASS) != DEVCLASS:
        raise exc.UnexpectedDeviceProperty(
            f"Got {properties['devclass']} device when expected {DEVCLASS}."
        )
    if expected_id != "*" and properties.get("device_id", expected_id) != expected_id:
        raise exc.UnexpectedDeviceProperty(
            f"Unrecognized device identity '{properties['device_id']}' expected '{expected_id}'"
        )
    device_id = properties.get("device_id", expected_id)
    # qubesd overwrites these from the argument, so a payload's own values are ignored.
    for key in ("backend_domain", "port_id", "devclass", "device_id", "port", "device", "options"):
        properties.pop(key, None)
    unexpected = set(properties) - {"mode", "frontend_domain"}
    if unexpected:
        name = sorted(unexpected)[0]
        raise TypeError(f"DeviceAssignment.__init__() got an unexpected keyword argument '{name}'")
    mode = properties.get("mode", "manual")
    if mode not in ASSIGNMENT_MODES:
        raise ValueError(f"'{mode}' is not a valid AssignmentMode")
    if "frontend_domain" in properties:
        if ref.backend == "*":
            raise exc.ProtocolError("Cannot determine backend domain")
        if not devs.qubes.exists(properties["frontend_domain"]):
            raise KeyError(properties["frontend_domain"])
    return mode, device_id, options, properties.get("frontend_domain")


def _check_denied(devices_denied: str, full_info: bool) -> None:
    if len(devices_denied) % 7:
        raise exc.QubesValueError(
            f"Invalid length of interfaces={devices_denied!r} "
            f"(is {len(devices_denied)}, expected multiple of 7)"
        )
    if not full_info:
        raise exc.PermissionDenied("Could not load interfaces to verify against denied list")
    for start in range(0, len(devices_denied), 7):
        pattern = devices_denied[start : start + 7]
        if all(p in ("*", c) for p, c in zip(pattern, _BLOCK_INTERFACE, strict=True)):
            raise exc.PermissionDenied("Device exposes a banned interface: Block Device")


def _resolve_single(
    devs: DeviceView, ref: DeviceRef, device_id: str
) -> tuple[str, BlockDeviceSpec]:
    """``DeviceAssignment.device``: exactly one real device, else ``ProtocolError``."""
    ambiguous = exc.ProtocolError(f"Cannot attach ambiguous {DEVCLASS} device.")
    if ref.backend == "*":
        raise ambiguous
    visible = devs.visible(ref.backend)
    if ref.port_id != "*":
        spec = visible.get(ref.port_id)
        if spec is None:
            # qubesd gets an UnknownDevice here (backend halted or no such port).
            raise exc.ProtocolError(f"{DEVCLASS} device not recognized in {ref.port_id} port.")
        if device_id in ("*", devs.device_id(ref.backend, ref.port_id)):
            return ref.backend, spec
        raise ambiguous
    if device_id == UNKNOWN_DEVICE_ID:
        raise ambiguous
    matches = [
        s for s in visible.values() if device_id in ("*", devs.device_id(ref.backend, s.port_id))
    ]
    if len(matches) != 1:
        raise ambiguous
    return ref.backend, matches[0]


def check_options(options: dict[str, str], spec: BlockDeviceSpec) -> dict[str, str]:
    """``ext/block.py`` option rules; returns the options libvirt gets (defaults filled)."""
    result = dict(options)
    for option, value in options.items():
        if option == "frontend-dev":
            if not value.startswith(("xvd", "sd")):
                raise exc.QubesValueError("Invalid frontend-dev option value: " + value)
        elif option == "read-only":
            if value.lower() in _TRUE:
                result[option] = "yes"
            elif value.lower() in _FALSE:
                result[option] = "no"
            else:
                raise exc.QubesValueError(f"Invalid literal for boolean property: {value!r}")
        elif option == "devtype":
            if value not in ("disk", "cdrom"):
                raise exc.QubesValueError("devtype option can only have 'disk' or 'cdrom' value")
        else:
            raise exc.QubesValueError(f"Unsupported option {option}")
    if "read-only" not in result:
        result["read-only"] = "yes" if spec.mode == "r" else "no"
    if result["read-only"] == "no" and spec.mode == "r":
        raise exc.QubesValueError("This device can be attached only read-only")
    return result


def check_libvirt(devs: DeviceView, frontend: str, backend: str, options: dict[str, str]) -> None:
    """Refusals that come from libxl in a real system, and the default frontend node."""
    if frontend == backend:
        raise LibvirtError("cannot attach a block device to the qube that exposes it")
    if frontend == "dom0":
        raise LibvirtError("block devices cannot be attached to dom0")
    used = set(SYSTEM_DISKS) | {
        dict(a.options).get("frontend-dev", "") for a in devs.attached_to(frontend)
    }
    if "frontend-dev" in options:
        if options["frontend-dev"] in used or not _FRONTEND_DEV_RE.match(options["frontend-dev"]):
            raise LibvirtError(f"libxenlight failed to attach disk {options['frontend-dev']!r}")
        return
    free = [dev for dev in FRONTENDS if dev not in used]
    if not free:
        raise LibvirtError("no free frontend device")
    options["frontend-dev"] = free[0]
