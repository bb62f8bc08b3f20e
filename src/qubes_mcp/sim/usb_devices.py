"""USB devices of the emulated dom0 (the ``usb`` device class of R4.3's USB proxy extension).

What ``qubes-app-linux-usb-proxy`` (``qubesusbproxy/core3ext.py``) adds to qubesd, on the
R4.3 device protocol shared with block devices (``qubes/api/admin.py`` ``vm_device_*``,
``qubes/device_protocol.py``): a backend that runs (usually ``sys-usb``) publishes its USB
devices, each on a port named by its bus path (``2-1``, ``1-1.2``); the device id is
``<vendor id>:<product id>:<serial>:<interfaces>``; attaching runs ``qubes.USBAttach`` in the
frontend (emulated: recorded), and needs both ends running. A USB attachment takes no user
options (the extension refuses them) and has no read-only mode. Wiring::

    usb = UsbDevices(qubes)
    admin.vm.device.usb.Available / Attached / Assigned -> usb.available / attached / assigned
    admin.vm.device.usb.Attach / Detach                 -> events = usb.attach / detach
    qube started / stopped / removed                    -> usb.qube_started / detach_all_of / forget
    fleet ``usb_devices`` entry                         -> usb.expose(name, UsbDeviceSpec...)

Assignments (``Assign``, ``Unassign``, ``Set.assignment``) are not emulated for USB (the gate
never assigns); ``Assigned`` lists none. Errors are the classes R4.3 raises, as in
``sim.devices``; nothing changes when one is raised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from qubes_mcp.sim import exc
from qubes_mcp.sim.device_model import Attachment, Event, ExposedDevices, QubeStates
from qubes_mcp.sim.device_wire import DeviceRef, pack, unpack

DEVCLASS = "usb"
#: a USB port as the proxy names it: bus, ``-``, the port path (R4.3 ``usb_device_re``)
PORT_ID_RE = re.compile(r"\A[0-9]+-[0-9]+(\.[0-9]+)*\Z")
_HEX4 = re.compile(r"\A[0-9a-f]{4}\Z")
_TEXT = re.compile(r"\A[A-Za-z0-9 ._,()+-]{0,64}\Z")


@dataclass(frozen=True)
class UsbDeviceSpec:
    """A USB device a backend publishes (``/qubes-usb-devices/<port>`` in its QubesDB)."""

    port_id: str
    vendor_id: str = "0000"
    product_id: str = "0000"
    vendor: str = ""
    product: str = ""
    serial: str = ""
    #: the interface classes, as the protocol's 7-character codes (``u080650``: mass storage)
    interfaces: str = "u080650"

    def __post_init__(self) -> None:
        if not PORT_ID_RE.match(self.port_id):
            raise ValueError(f"invalid usb port id: {self.port_id!r}")
        if not (_HEX4.match(self.vendor_id) and _HEX4.match(self.product_id)):
            raise ValueError(f"invalid usb ids for {self.port_id!r}")
        if not all(_TEXT.match(v) for v in (self.vendor, self.product, self.serial)):
            raise ValueError(f"invalid usb description for {self.port_id!r}")
        if len(self.interfaces) % 7 or not re.fullmatch(r"[a-z0-9]*", self.interfaces):
            raise ValueError(f"invalid usb interfaces for {self.port_id!r}")

    @property
    def device_id(self) -> str:
        return (
            f"{self.vendor_id}:{self.product_id}:{self.serial.replace(' ', '_')}:{self.interfaces}"
        )

    @classmethod
    def from_fleet(cls, entry: Mapping[str, object]) -> UsbDeviceSpec:
        """A fleet ``usb_devices`` entry: ``port`` and optionally ``vendor_id``,
        ``product_id``, ``vendor``, ``product``, ``serial``, ``interfaces``."""
        known = {"port", "vendor_id", "product_id", "vendor", "product", "serial", "interfaces"}
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"unknown usb device keys: {sorted(unknown)}")
        fields = {k: str(v) for k, v in entry.items() if k != "port"}
        return cls(port_id=str(entry["port"]), **fields)

    def to_json(self) -> dict[str, str]:
        return {
            "port": self.port_id,
            "vendor_id": self.vendor_id,
            "product_id": self.product_id,
            "vendor": self.vendor,
            "product": self.product,
            "serial": self.serial,
            "interfaces": self.interfaces,
        }


class UsbDevices(ExposedDevices[UsbDeviceSpec]):
    """USB devices exposed by backends and attached to frontends, for one emulated dom0."""

    devclass = DEVCLASS

    def device_str(self, backend: str, spec: UsbDeviceSpec) -> str:
        return f"{backend}:{spec.port_id}:{spec.device_id}"

    def available(self, backend: str, arg: str = "") -> str:
        """``admin.vm.device.usb.Available``: ``<port_id>:<device_id> <info>\\n`` lines."""
        lines = {}
        for spec in self.visible(backend).values():
            if arg and spec.port_id != arg:
                continue
            pairs = [
                ("device_id", spec.device_id),
                ("port_id", spec.port_id),
                ("devclass", DEVCLASS),
                ("backend_domain", backend),
                ("vendor", spec.vendor or "unknown"),
                ("product", spec.product or "unknown"),
                ("manufacturer", spec.vendor or "unknown"),
                ("name", spec.product or "unknown"),
                ("serial", spec.serial or "unknown"),
            ]
            att = self.attachment_of(backend, spec.port_id)
            if att is not None:
                pairs.append(("attachment", att.frontend))
            pairs.append(("interfaces", spec.interfaces))
            lines[f"{spec.port_id}:{spec.device_id}"] = pack(pairs)
        return "".join(f"{key} {lines[key]}\n" for key in sorted(lines))

    def attached(self, frontend: str, arg: str = "") -> str:
        """``admin.vm.device.usb.Attached``: ``<backend>+<port_id>:<device_id> <assignment>``."""
        atts = self.attached_to(frontend)
        if arg:
            parts = arg.split("+", 1)
            if len(parts) != 2:
                raise ValueError(f"not enough values to unpack (expected 2, got {len(parts)})")
            atts = [a for a in atts if (a.backend, a.port_id) == (parts[0], parts[1])]
        lines = {}
        for att in atts:
            spec = self._exposed.get(att.backend, {}).get(att.port_id)
            dev_id = spec.device_id if spec is not None else "*"
            pairs = [
                ("device_id", dev_id),
                ("port_id", att.port_id),
                ("devclass", DEVCLASS),
                ("backend_domain", att.backend),
                ("mode", "manual"),
                ("frontend_domain", att.frontend),
            ]
            lines[f"{att.backend}+{att.port_id}:{dev_id}"] = pack(pairs)
        return "".join(f"{key} {lines[key]}\n" for key in sorted(lines))

    def assigned(self, frontend: str, arg: str = "") -> str:
        """``admin.vm.device.usb.Assigned``: none (assignments are not emulated for USB)."""
        if arg and "+" not in arg:
            raise ValueError("not enough values to unpack (expected 2, got 1)")
        return ""

    def attach(self, frontend: str, untrusted_arg: str, untrusted_payload: bytes) -> list[Event]:
        """``admin.vm.device.usb.Attach``.

        Raises:
            KeyError: the backend does not exist; ValueError: no ``+`` in the argument.
            ProtocolError: the device is not there, or the payload names another device.
            QubesVMNotRunningError: the frontend is not running.
            QubesException: user options (the USB extension takes none).
            DeviceAlreadyAttached: it is attached somewhere already.
        """
        ref = DeviceRef.from_qarg(untrusted_arg)
        if ref.backend != "*" and not self.qubes.exists(ref.backend):
            raise KeyError(ref.backend)
        spec = self.visible(ref.backend).get(ref.port_id)
        if spec is None or ref.device_id not in ("*", spec.device_id):
            raise exc.ProtocolError(f"{DEVCLASS} device not recognized in {ref.port_id} port.")
        props, options = unpack(untrusted_payload)
        expected = {"port_id": spec.port_id, "devclass": DEVCLASS, "backend_domain": ref.backend}
        for key, value in expected.items():
            if key in props and props[key] != value:
                raise exc.ProtocolError("Unexpected device in the payload")
        if props.get("mode", "manual") != "manual":
            raise exc.ProtocolError("Attach is for manual mode; use assign")
        if not self.qubes.is_running(frontend):
            raise exc.QubesVMNotRunningError(
                frontend, "VM not running, cannot attach device, do you mean `assign`?"
            )
        if options:
            raise exc.QubesException("USB device attach do not support user options")
        att = self.attachment_of(ref.backend, spec.port_id)
        if att is not None:
            raise exc.DeviceAlreadyAttached(
                f"Device {self.device_str(ref.backend, spec)} already attached to {att.frontend}"
            )
        self._attached.append(Attachment(ref.backend, spec.port_id, frontend))
        kwargs = {"device": self.device_str(ref.backend, spec), "options": "{}"}
        return [
            (frontend, f"device-pre-attach:{DEVCLASS}", kwargs),
            (frontend, f"device-attach:{DEVCLASS}", dict(kwargs)),
        ]

    def detach(self, frontend: str, untrusted_arg: str) -> list[Event]:
        """``admin.vm.device.usb.Detach`` (DeviceNotAssigned when nothing is there)."""
        ref = DeviceRef.from_qarg(untrusted_arg)
        if ref.backend != "*" and not self.qubes.exists(ref.backend):
            raise KeyError(ref.backend)
        for att in self.attached_to(frontend):
            if att.port_id == ref.port_id and ref.backend in ("*", att.backend):
                break
        else:
            raise exc.DeviceNotAssigned(
                f"{DEVCLASS} device {ref.port_id} not attached to {frontend}"
            )
        self._attached.remove(att)
        kwargs = {"port": f"{att.backend}:{att.port_id}"}
        return [
            (frontend, f"device-pre-detach:{DEVCLASS}", kwargs),
            (frontend, f"device-detach:{DEVCLASS}", dict(kwargs)),
        ]

    def qube_started(self, name: str) -> list[Event]:
        self._attached = [a for a in self._attached if name not in (a.backend, a.frontend)]
        return self._announce(name, list(self.visible(name).values()))

    def detach_all_of(self, name: str) -> list[Event]:
        """A qube stopped: its devices vanish, and its attachments in either role end."""
        events: list[Event] = []
        for spec in self._exposed.get(name, {}).values():
            events.append((name, f"device-removed:{DEVCLASS}", {"port": f"{name}:{spec.port_id}"}))
        for att in [a for a in self._attached if name in (a.backend, a.frontend)]:
            self._attached.remove(att)
            if att.frontend != name and self.qubes.is_running(att.frontend):
                kwargs = {"port": f"{att.backend}:{att.port_id}"}
                events.append((att.frontend, f"device-detach:{DEVCLASS}", kwargs))
            elif att.frontend == name:
                events.append(
                    (name, f"device-detach:{DEVCLASS}", {"port": f"{att.backend}:{att.port_id}"})
                )
        return events

    def to_json(self) -> dict[str, object]:
        """What persists: the exposed devices (attachments are running state)."""
        return {
            "exposed": {
                backend: [spec.to_json() for spec in ports.values()]
                for backend, ports in self._exposed.items()
            }
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object], qubes: QubeStates) -> UsbDevices:
        devs = cls(qubes)
        exposed = data.get("exposed", {})
        if not isinstance(exposed, Mapping):
            raise ValueError("'exposed' must map backend names to device lists")
        for backend, specs in exposed.items():
            for spec in specs:
                devs.expose(str(backend), UsbDeviceSpec.from_fleet(spec))
        return devs
