"""Persistent block device assignments (R4.3 ``Assign``, ``Unassign``, ``Set.assignment``).

An assignment says "attach this device to this qube automatically": ``auto-attach`` when the
qube starts or the device appears, ``ask-to-attach`` after the user confirms (the emulator
has no confirmation dialog, so these are never attached automatically: the same outcome as a
dismissed dialog), ``required`` as part of the qube's start (the start fails if the device is
not available). Sources: R4.3 ``qubes/devices.py`` (``assign``, ``unassign``,
``update_assignment``, ``detach``), ``qubes/ext/block.py`` (``on_domain_start``),
``qubes/ext/utils.py`` (``device_list_change``), ``qubes/vm/qubesvm.py`` (required devices
at start), ``qubes/app.py`` (removal of a backend with devices assigned elsewhere).

Used through ``sim.devices.BlockDevices``; nothing here is called by qubesd directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qubes_mcp.sim import exc
from qubes_mcp.sim.device_attach import check_libvirt, check_options, parse_assignment
from qubes_mcp.sim.device_model import DEVCLASS, BlockDeviceSpec, Event, LibvirtError
from qubes_mcp.sim.device_wire import UNKNOWN_DEVICE_ID, DeviceRef, pack

if TYPE_CHECKING:
    from qubes_mcp.sim.devices import BlockDevices

MODES = {"required": "required", "ask-to-attach": "ask-to-attach", "auto-attach": "auto-attach"}


@dataclass(frozen=True)
class Assignment:
    """One device assigned to ``frontend`` (a ``<device>`` in qubes.xml in Qubes)."""

    frontend: str
    backend: str
    port_id: str
    device_id: str
    mode: str
    frontend_domain: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def device_str(self) -> str:
        """``str(VirtualDevice)``: ``<backend>:<port_id>:<device_id>``."""
        return f"{self.backend}:{self.port_id}:{self.device_id}"

    def same_device(self, backend: str, port_id: str, device_id: str) -> bool:
        """qubesd's ``DeviceAssignment.__eq__``: exactly the same port and device id."""
        return (self.backend, self.port_id, self.device_id) == (backend, port_id, device_id)

    def matches(self, backend: str, port_id: str, device_id: str) -> bool:
        """qubesd's ``DeviceAssignment.matches``: ``*`` fields match anything."""
        return (
            self.backend == backend
            and self.port_id in ("*", port_id)
            and self.device_id in ("*", device_id)
        )

    def serialize(self) -> str:
        pairs = [
            ("device_id", self.device_id),
            ("port_id", self.port_id),
            ("devclass", DEVCLASS),
            ("backend_domain", self.backend),
            ("mode", self.mode),
        ]
        if self.frontend_domain is not None:
            pairs.append(("frontend_domain", self.frontend_domain))
        pairs += [(f"_{key}", value) for key, value in self.options]
        return pack(pairs)

    def to_json(self) -> dict[str, object]:
        return {
            "frontend": self.frontend,
            "backend": self.backend,
            "port_id": self.port_id,
            "device_id": self.device_id,
            "mode": self.mode,
            "frontend_domain": self.frontend_domain,
            "options": [list(kv) for kv in self.options],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Assignment:
        mode = str(data["mode"])
        if mode not in MODES:
            raise ValueError(f"invalid assignment mode {mode!r}")
        fdom = data.get("frontend_domain")
        raw_options = data.get("options", [])
        if not isinstance(raw_options, list):
            raise ValueError("assignment options must be a list")
        return cls(
            frontend=str(data["frontend"]),
            backend=str(data["backend"]),
            port_id=str(data["port_id"]),
            device_id=str(data["device_id"]),
            mode=mode,
            frontend_domain=None if fdom is None else str(fdom),
            options=tuple((str(k), str(v)) for k, v in raw_options),
        )


def specificity(a: Assignment) -> tuple[bool, bool]:
    """Sort key, most specific first (``port:dev``, ``port:*``, ``*:dev``, ``*:*``)."""
    return (a.port_id == "*", a.device_id == "*")


def _ref(devs: BlockDevices, untrusted_arg: str) -> DeviceRef:
    ref = DeviceRef.from_qarg(untrusted_arg)
    if ref.backend != "*" and not devs.qubes.exists(ref.backend):
        raise KeyError(ref.backend)
    return ref


def assign(
    devs: BlockDevices, frontend: str, untrusted_arg: str, untrusted_payload: bytes
) -> tuple[Assignment, list[Event]]:
    """``admin.vm.device.block.Assign``: validate; return the new assignment and events.

    Raises:
        KeyError, ValueError: Unknown backend qube; argument without ``+`` (not reported).
        ProtocolError: Bad payload (not reported).
        DeviceAlreadyAssigned: The same device is already assigned to ``frontend``.
        ValueError: Mode ``manual`` ("Only auto-attachable devices can be assigned.").
    """
    ref = _ref(devs, untrusted_arg)
    mode, device_id, options, fdom = parse_assignment(devs, ref, ref.device_id, untrusted_payload)
    new = Assignment(
        frontend, ref.backend, ref.port_id, device_id, mode, fdom, tuple(options.items())
    )
    for old in devs.assignments_of(frontend):
        if old.same_device(new.backend, new.port_id, new.device_id):
            raise exc.DeviceAlreadyAssigned(
                f"{DEVCLASS} device {new.device_str} already assigned to {frontend}"
            )
    if mode == "manual":
        raise ValueError("Only auto-attachable devices can be assigned.")
    kwargs = {"device": new.device_str, "options": str(options)}
    return new, [
        (frontend, f"device-pre-assign:{DEVCLASS}", kwargs),
        (frontend, f"device-assign:{DEVCLASS}", dict(kwargs)),
    ]


def find(devs: BlockDevices, frontend: str, ref: DeviceRef) -> Assignment | None:
    for old in devs.assignments_of(frontend):
        if old.same_device(ref.backend, ref.port_id, ref.device_id):
            return old
    return None


def unassign(devs: BlockDevices, frontend: str, untrusted_arg: str) -> tuple[Assignment, Event]:
    """``admin.vm.device.block.Unassign``: the assignment to drop and its event.

    Raises:
        DeviceNotAssigned: No assignment of exactly that device (the ``*`` of an argument
            without device id only matches an assignment made with ``*``).
    """
    ref = _ref(devs, untrusted_arg)
    old = find(devs, frontend, ref)
    if old is None:
        shown = f"{ref.backend}:{ref.port_id}:{ref.device_id}"
        raise exc.DeviceNotAssigned(f"{DEVCLASS} device {shown} not assigned to {frontend}")
    return old, (frontend, f"device-unassign:{DEVCLASS}", {"device": old.device_str})


def set_mode(
    devs: BlockDevices, frontend: str, untrusted_arg: str, untrusted_payload: bytes
) -> tuple[Assignment, Assignment | None, list[Event]]:
    """``admin.vm.device.block.Set.assignment``: ``(old, new or None if unchanged, events)``.

    Raises:
        PermissionDenied: The payload is not ``required``/``ask-to-attach``/``auto-attach``.
        QubesValueError: The device is not assigned to ``frontend``.
    """
    mode = MODES.get(untrusted_payload.decode("ascii", errors="replace"))
    if mode is None:
        raise exc.PermissionDenied()
    ref = _ref(devs, untrusted_arg)
    old = find(devs, frontend, ref)
    shown = f"{ref.backend}:{ref.port_id}:{ref.device_id}"
    if old is None:
        raise exc.QubesValueError(f"Device {shown} not assigned to {frontend}")
    if old.mode == mode:
        return old, None, []
    new = Assignment(
        old.frontend,
        old.backend,
        old.port_id,
        old.device_id,
        mode,
        old.frontend_domain,
        old.options,
    )
    options = str(dict(old.options))
    return (
        old,
        new,
        [
            (frontend, f"device-pre-assign:{DEVCLASS}", {"device": shown, "options": options}),
            (frontend, f"device-assignment-changed:{DEVCLASS}", {"device": shown}),
        ],
    )


def devices_of(devs: BlockDevices, a: Assignment) -> list[BlockDeviceSpec | None]:
    """qubesd's ``DeviceAssignment.devices``; ``None`` stands for an ``UnknownDevice``."""
    if a.backend == "*":
        return []
    visible = devs.visible(a.backend)
    if a.port_id != "*":
        spec = visible.get(a.port_id)
        if spec is None:
            return [None]
        if a.device_id in ("*", devs.device_id(a.backend, a.port_id)):
            return [spec]
        return []
    if a.device_id == UNKNOWN_DEVICE_ID:
        return []
    return [
        s for s in visible.values() if a.device_id in ("*", devs.device_id(a.backend, s.port_id))
    ]


def check_start(devs: BlockDevices, frontend: str) -> None:
    """Before a qube starts: every ``required`` device must be available.

    Raises:
        QubesException: ``Block device <backend>:<port>:<id> not available``.
    """
    for a in devs.assignments_of(frontend):
        if a.mode == "required" and all(d is None for d in devices_of(devs, a)):
            raise exc.QubesException(f"Block device {a.device_str} not available")


def _try_attach(
    devs: BlockDevices, frontend: str, a: Assignment, spec: BlockDeviceSpec, notify: bool
) -> list[Event]:
    """qubesd's ``attach_and_notify``: a refused attachment is only logged there."""
    try:
        options = check_options(dict(a.options), spec)
        check_libvirt(devs, frontend, a.backend, options)
    except (exc.QubesException, LibvirtError):
        return []
    devs.record_attachment(frontend, a.backend, spec.port_id, options)
    if not notify:
        return []
    device = f"{a.backend}:{spec.port_id}:{devs.device_id(a.backend, spec.port_id)}"
    return [(frontend, f"device-attach:{DEVCLASS}", {"device": device, "options": str(options)})]


def attach_on_start(devs: BlockDevices, frontend: str) -> list[Event]:
    """``frontend`` just started: attach its assigned devices that are free.

    ``required`` ones are part of the domain's definition in Qubes, so they are attached
    without an event; ``auto-attach`` ones fire ``device-attach``; ``ask-to-attach`` ones wait
    for a confirmation that never comes in the emulator. Most specific assignments first.
    """
    events: list[Event] = []
    for a in sorted(devs.assignments_of(frontend), key=specificity):
        if a.mode == "ask-to-attach":
            continue
        for spec in devices_of(devs, a):
            if spec is not None and devs.attachment_of(a.backend, spec.port_id) is None:
                events += _try_attach(devs, frontend, a, spec, notify=a.mode != "required")
    return events


def attach_on_appear(devs: BlockDevices, backend: str, port_ids: list[str]) -> list[Event]:
    """Devices appeared on ``backend`` (it started, or a hot-plug): attach each to the one
    running qube that has it assigned; with several candidates qubesd asks the user, which
    the emulator cannot, so nothing is attached (``device_list_change``)."""
    events: list[Event] = []
    for port_id in port_ids:
        spec = devs.visible(backend).get(port_id)
        if spec is None or devs.attachment_of(backend, port_id) is not None:
            continue
        dev_id = devs.device_id(backend, port_id)
        candidates: dict[str, Assignment] = {}
        for a in sorted(devs.all_assignments(), key=specificity):
            if (
                a.frontend != backend
                and devs.qubes.is_running(a.frontend)
                and a.matches(backend, port_id, dev_id)
            ):
                candidates.setdefault(a.frontend, a)
        if len(candidates) == 1:
            ((frontend, a),) = candidates.items()
            if a.mode != "ask-to-attach":
                events += _try_attach(devs, frontend, a, spec, notify=True)
    return events
