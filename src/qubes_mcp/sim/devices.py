"""Block devices of the emulated dom0: what each backend exposes and what is attached where.

Behaviour follows R4.3 (``qubes/api/admin.py`` device handlers, ``qubes/devices.py``,
``qubes/ext/block.py``). Wiring for the emulated qubesd (helper B)::

    devs = BlockDevices(qubes)   # qubes: anything with exists(name) and is_running(name)
    admin.vm.device.block.Available -> devs.available(dest, arg)
    admin.vm.device.block.Attached  -> devs.attached(dest, arg)
    admin.vm.device.block.Assigned  -> devs.assigned(dest, arg)          (always empty)
    admin.vm.device.block.Attach    -> events = devs.attach(dest, arg, payload,
                                                            devices_denied=dest.devices_denied)
    admin.vm.device.block.Detach    -> events = devs.detach(dest, arg)   (payload must be empty)
    qube started                    -> events = devs.qube_started(name)
    qube stopped / killed           -> events = devs.detach_all_of(name)
    qube removed                    -> devs.forget(name)
    fleet ``block_devices`` entry   -> devs.expose(name, BlockDeviceSpec.from_fleet(entry))
    hot-plug / unplug (tests, demo) -> devs.expose(...) / devs.unexpose(name, port_id)

Attachments are volatile, as in Qubes (they live in the running domains' libvirt XML):
persist ``exposed`` and ``assigned`` of ``to_json()``; an attachment record whose frontend is
not running never counts. Assignments (persistent, ``sim.device_assign``)::

    admin.vm.device.block.Assign         -> events = devs.assign(dest, arg, payload)
    admin.vm.device.block.Unassign       -> events = devs.unassign(dest, arg)
    admin.vm.device.block.Set.assignment -> events = devs.set_assignment(dest, arg, payload)
    before a qube starts                 -> devs.check_start(name)  (QubesException)
    before a qube is removed             -> devs.provided_assignments(name)  (in use if any)

Every method that changes something returns the events qubesd would fire, as
``(subject, event, kwargs)`` with the kwargs already rendered as qubesd's event stream does
(``str(value)``); fire them in order. Errors are the classes R4.3 raises: ``sim.exc``
``QubesException`` subclasses are reported to the client; ``ProtocolError``,
``PermissionDenied``, ``KeyError`` (unknown backend qube), ``ValueError`` and ``LibvirtError``
give a zero-byte reply on R4.3. Nothing changes when an error is raised.

"Running" means what qubesd's ``is_running()`` means: the libvirt domain is active, so a
paused qube counts as running (and a device can be attached to it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from qubes_mcp.sim import device_assign, exc
from qubes_mcp.sim.device_assign import Assignment
from qubes_mcp.sim.device_attach import check_attach
from qubes_mcp.sim.device_model import (
    DEVCLASS,
    Attachment,
    BlockDeviceSpec,
    Event,
    ExposedDevices,
    LibvirtError,
    QubeStates,
)
from qubes_mcp.sim.device_wire import UNKNOWN_DEVICE_ID, DeviceRef, pack

__all__ = [
    "DEVCLASS",
    "Assignment",
    "Attachment",
    "BlockDeviceSpec",
    "BlockDevices",
    "Event",
    "LibvirtError",
    "QubeStates",
]


class BlockDevices(ExposedDevices[BlockDeviceSpec]):
    """Block devices exposed by backends and attached to frontends, for one emulated dom0."""

    devclass = DEVCLASS

    def __init__(self, qubes: QubeStates) -> None:
        super().__init__(qubes)
        self._assigned: list[Assignment] = []

    # --- what backends publish -------------------------------------------------------------

    def expose(self, backend: str, spec: BlockDeviceSpec) -> list[Event]:
        """Publish (hot-plug) a device; ``device-added`` fires if the backend runs, and the
        device goes to the qube it is assigned to."""
        events = super().expose(backend, spec)
        if events:
            events += device_assign.attach_on_appear(self, backend, [spec.port_id])
        return events

    def unexpose(self, backend: str, port_id: str) -> list[Event]:
        """Unplug a device: detached from its frontend first, then ``device-removed``."""
        spec = self._exposed.get(backend, {}).get(port_id)
        if spec is None:
            raise KeyError(port_id)
        events: list[Event] = []
        if self.qubes.is_running(backend):
            events.append((backend, f"device-list-change:{DEVCLASS}", {}))
            events += self._drop_attachments(backend, port_id)
            events.append((backend, f"device-removed:{DEVCLASS}", {"port": f"{backend}:{port_id}"}))
        del self._exposed[backend][port_id]
        return events

    def device_id(self, backend: str, port_id: str) -> str:
        """The R4.3 block device id: ``<parent id>:<partition number>`` (``:None`` for
        ``sda``, ``:None:1`` for ``sda1`` under ``sda``)."""
        spec = self.visible(backend).get(port_id)
        if spec is None:
            return UNKNOWN_DEVICE_ID
        parent_id = "" if spec.parent is None else self.device_id(backend, spec.parent)
        digits = re.findall(r"\d+$", port_id)
        return f"{parent_id}:{int(digits[-1]) if digits else None}"

    def device_str(self, backend: str, spec: BlockDeviceSpec) -> str:
        """``str(BlockDevice)`` in events: ``<backend>:<port_id>:<device_id>``."""
        return f"{backend}:{spec.port_id}:{self.device_id(backend, spec.port_id)}"

    def _serialize_info(self, backend: str, spec: BlockDeviceSpec) -> str:
        if spec.parent is None:
            manufacturer = f"hosted by {backend}"
        else:
            manufacturer = f"sub-device of {backend}:{spec.parent}"
        pairs = [
            ("device_id", self.device_id(backend, spec.port_id)),
            ("port_id", spec.port_id),
            ("devclass", DEVCLASS),
            ("backend_domain", backend),
            # qubesd walks a set here, so its order varies per process; ours is fixed.
            ("manufacturer", manufacturer),
        ]
        pairs += [(k, v) for k, v in (("name", spec.name), ("serial", spec.serial)) if v]
        att = self.attachment_of(backend, spec.port_id)
        if att is not None:
            pairs.append(("attachment", att.frontend))
        pairs.append(("interfaces", "b******"))
        if spec.parent is not None:
            pairs += [("parent_port_id", spec.parent), ("parent_devclass", DEVCLASS)]
        return pack(pairs)

    def available(self, backend: str, arg: str = "") -> str:
        """``admin.vm.device.block.Available``: ``<port_id>:<device_id> <info>\\n`` lines."""
        specs = list(self.visible(backend).values())
        if arg:
            specs = [s for s in specs if s.port_id == arg]
        lines = {f"{s.port_id}:{self.device_id(backend, s.port_id)}": s for s in specs}
        return "".join(
            f"{key} {self._serialize_info(backend, lines[key])}\n" for key in sorted(lines)
        )

    # --- what frontends have attached ------------------------------------------------------

    def attached(self, frontend: str, arg: str = "") -> str:
        """``admin.vm.device.block.Attached``: ``<backend>+<port_id>:<device_id> <assignment>``.

        Raises:
            ValueError: ``arg`` given without a ``+`` (qubesd fails unpacking it).
        """
        atts = self.attached_to(frontend)
        if arg:
            parts = arg.split("+", 1)
            if len(parts) != 2:
                raise ValueError(f"not enough values to unpack (expected 2, got {len(parts)})")
            atts = [a for a in atts if (a.backend, a.port_id) == (parts[0], parts[1])]
            if len(atts) > 1:
                raise exc.ProtocolError()
        lines: dict[str, str] = {}
        for att in atts:
            dev_id = self.device_id(att.backend, att.port_id)
            key = f"{att.backend}+{att.port_id}:{dev_id}"
            assigned = [
                a
                for a in self.assignments_of(frontend)
                if a.same_device(att.backend, att.port_id, dev_id)
            ]
            if assigned:  # qubesd lists the assignment itself (its mode and options)
                lines[key] = assigned[0].serialize()
                continue
            pairs = [
                ("device_id", dev_id),
                ("port_id", att.port_id),
                ("devclass", DEVCLASS),
                ("backend_domain", att.backend),
                ("mode", "manual"),
                ("frontend_domain", att.frontend),
            ]
            pairs += [(f"_{opt}", value) for opt, value in att.options]
            lines[key] = pack(pairs)
        return "".join(f"{key} {lines[key]}\n" for key in sorted(lines))

    # --- assignments (persistent; see sim.device_assign) ----------------------------------

    def assignments_of(self, frontend: str) -> list[Assignment]:
        return [a for a in self._assigned if a.frontend == frontend]

    def all_assignments(self) -> list[Assignment]:
        return list(self._assigned)

    def assigned(self, frontend: str, arg: str = "") -> str:
        """``admin.vm.device.block.Assigned``: ``<backend>+<port_id>:<device_id> <assignment>``.

        Raises:
            ValueError: ``arg`` given without a ``+``.
        """
        items = self.assignments_of(frontend)
        if arg:
            parts = arg.split("+", 1)
            if len(parts) != 2:
                raise ValueError(f"not enough values to unpack (expected 2, got {len(parts)})")
            items = [a for a in items if (a.backend, a.port_id) == (parts[0], parts[1])]
            if len(items) > 1:
                raise exc.ProtocolError()
        lines = {f"{a.backend}+{a.port_id}:{a.device_id}": a.serialize() for a in items}
        return "".join(f"{key} {lines[key]}\n" for key in sorted(lines))

    def assign(self, frontend: str, untrusted_arg: str, untrusted_payload: bytes) -> list[Event]:
        """``admin.vm.device.block.Assign`` (persistent: save afterwards). Does not attach."""
        new, events = device_assign.assign(self, frontend, untrusted_arg, untrusted_payload)
        self._assigned.append(new)
        return events

    def unassign(self, frontend: str, untrusted_arg: str) -> list[Event]:
        """``admin.vm.device.block.Unassign`` (save afterwards). Does not detach."""
        old, event = device_assign.unassign(self, frontend, untrusted_arg)
        self._assigned.remove(old)
        return [event]

    def set_assignment(
        self, frontend: str, untrusted_arg: str, untrusted_payload: bytes
    ) -> list[Event]:
        """``admin.vm.device.block.Set.assignment`` (save afterwards)."""
        old, new, events = device_assign.set_mode(self, frontend, untrusted_arg, untrusted_payload)
        if new is not None:
            self._assigned[self._assigned.index(old)] = new
        return events

    def check_start(self, frontend: str) -> None:
        """Call before a qube starts (after ``domain-pre-start``): its ``required`` devices
        must be available, else ``QubesException`` (fire ``domain-start-failed``)."""
        device_assign.check_start(self, frontend)

    def provided_assignments(self, backend: str) -> list[str]:
        """Port ids of ``backend``'s devices assigned to other qubes; removing ``backend``
        then fails with ``QubesVMInUseError("VM has devices assigned to other VMs: …")``."""
        return [a.port_id for a in self._assigned if a.backend == backend and a.frontend != backend]

    def record_attachment(
        self, frontend: str, backend: str, port_id: str, options: dict[str, str]
    ) -> None:
        """Record an attachment made by the assignment logic (already validated)."""
        self._attached.append(Attachment(backend, port_id, frontend, tuple(options.items())))

    def attach(
        self,
        frontend: str,
        untrusted_arg: str,
        untrusted_payload: bytes,
        *,
        devices_denied: str = "",
    ) -> list[Event]:
        """``admin.vm.device.block.Attach``; see the module docstring for the errors."""
        backend, spec, options = check_attach(
            self, frontend, untrusted_arg, untrusted_payload, devices_denied
        )
        att = Attachment(backend, spec.port_id, frontend, tuple(options.items()))
        self._attached.append(att)
        kwargs = {"device": self.device_str(backend, spec), "options": str(options)}
        return [
            (frontend, f"device-pre-attach:{DEVCLASS}", kwargs),
            (frontend, f"device-attach:{DEVCLASS}", dict(kwargs)),
        ]

    def detach(self, frontend: str, untrusted_arg: str) -> list[Event]:
        """``admin.vm.device.block.Detach``.

        R4.3 matches the attached device by port id only (not by backend); kept as is.

        Raises:
            KeyError: The backend named in the argument does not exist.
            ValueError: The argument has no ``+``.
            DeviceNotAssigned: Nothing with that port id is attached to a running ``frontend``.
        """
        ref = DeviceRef.from_qarg(untrusted_arg)
        if ref.backend != "*" and not self.qubes.exists(ref.backend):
            raise KeyError(ref.backend)
        for att in self.attached_to(frontend):
            if att.port_id == ref.port_id:
                break
        else:
            raise exc.DeviceNotAssigned(
                f"{DEVCLASS} device {ref.port_id} not attached to {frontend}"
            )
        dev_id = self.device_id(att.backend, att.port_id)
        for a in self.assignments_of(frontend):
            if a.mode == "required" and a.matches(att.backend, att.port_id, dev_id):
                raise exc.QubesVMNotHaltedError(
                    frontend,
                    "Can not detach a required device from a non halted qube. "
                    "You need to unassign device first.",
                )
        self._attached.remove(att)
        kwargs = {"port": f"{att.backend}:{att.port_id}"}
        return [
            (frontend, f"device-pre-detach:{DEVCLASS}", kwargs),
            (frontend, f"device-detach:{DEVCLASS}", dict(kwargs)),
        ]

    # --- life cycle ------------------------------------------------------------------------

    def qube_started(self, name: str) -> list[Event]:
        """A qube came up: a fresh domain has no block attachments in either role (drop any
        stale record); as a frontend its assigned devices are attached, as a backend its
        devices appear (``device-added`` each) and go to the qube they are assigned to."""
        self._attached = [a for a in self._attached if name not in (a.backend, a.frontend)]
        events = device_assign.attach_on_start(self, name)
        specs = list(self.visible(name).values())
        if specs:
            events += self._announce(name, specs)
            events += device_assign.attach_on_appear(self, name, [s.port_id for s in specs])
        return events

    def detach_all_of(self, name: str) -> list[Event]:
        """A qube stopped: as a backend its devices vanish (``device-removed``, and detach
        from frontends), as a frontend every attachment ends (``device-detach``).

        Call it once per stop (shutdown, kill, or a crash); it needs no running state.
        """
        events: list[Event] = []
        for spec in self._exposed.get(name, {}).values():
            events.append((name, f"device-removed:{DEVCLASS}", {"port": f"{name}:{spec.port_id}"}))
            events += self._drop_attachments(name, spec.port_id)
        for att in [a for a in self._attached if a.frontend == name]:
            self._attached.remove(att)
            events.append(
                (name, f"device-detach:{DEVCLASS}", {"port": f"{att.backend}:{att.port_id}"})
            )
        return events

    def forget(self, name: str) -> None:
        """A qube was removed: drop what it exposed, attached or was assigned, either way."""
        super().forget(name)
        self._assigned = [a for a in self._assigned if name not in (a.backend, a.frontend)]

    def _drop_attachments(self, backend: str, port_id: str) -> list[Event]:
        """Detach a device from whichever frontend has it (``detach_and_notify``)."""
        events: list[Event] = []
        for att in [a for a in self._attached if (a.backend, a.port_id) == (backend, port_id)]:
            self._attached.remove(att)
            if not self.qubes.is_running(att.frontend):
                continue  # a stale record (e.g. from a saved state): nothing to notify
            kwargs = {"port": f"{att.backend}:{att.port_id}"}
            events.append((att.frontend, f"device-pre-detach:{DEVCLASS}", kwargs))
            events.append((att.frontend, f"device-detach:{DEVCLASS}", dict(kwargs)))
        return events

    # --- persistence -----------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        return {
            "exposed": {
                backend: [spec.to_json() for spec in ports.values()]
                for backend, ports in self._exposed.items()
            },
            "attached": [
                {
                    "backend": a.backend,
                    "port_id": a.port_id,
                    "frontend": a.frontend,
                    "options": [list(kv) for kv in a.options],
                }
                for a in self._attached
            ],
            "assigned": [a.to_json() for a in self._assigned],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object], qubes: QubeStates) -> BlockDevices:
        """Inverse of ``to_json``; every key is optional. Persist ``exposed`` and
        ``assigned`` (qubes.xml state); ``attached`` is volatile and may be left out."""
        devs = cls(qubes)
        exposed = data.get("exposed", {})
        if not isinstance(exposed, Mapping):
            raise ValueError("'exposed' must map backend names to device lists")
        for backend, specs in exposed.items():
            for spec in specs:
                devs._exposed.setdefault(str(backend), {})[spec["port_id"]] = (
                    BlockDeviceSpec.from_json(spec)
                )
        attached = data.get("attached", [])
        if not isinstance(attached, list):
            raise ValueError("'attached' must be a list")
        for item in attached:
            options = tuple((str(k), str(v)) for k, v in item.get("options", []))
            devs._attached.append(
                Attachment(
                    str(item["backend"]), str(item["port_id"]), str(item["frontend"]), options
                )
            )
        assigned = data.get("assigned", [])
        if not isinstance(assigned, list):
            raise ValueError("'assigned' must be a list")
        devs._assigned = [Assignment.from_json(item) for item in assigned]
        return devs
