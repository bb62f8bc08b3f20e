"""Data types of the emulated devices (shared by ``sim.devices``, ``sim.usb_devices`` and
``sim.device_attach``).

A fleet declares what each backend publishes as ``BlockDeviceSpec``s (or USB specs); an
``Attachment`` is one device attached to a running frontend (what a ``<disk>`` in its libvirt
XML records in Qubes). ``ExposedDevices`` is what every device class shares: published devices,
visible while their backend runs, and attachments, live while their frontend runs.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

DEVCLASS = "block"
#: Port ids a backend may publish (R4.3 ``ext/block.py`` ``name_re``; others are skipped).
PORT_ID_RE = re.compile(r"\A[a-z0-9-]{1,12}\Z")
_DESC_CHARS = frozenset(string.ascii_letters + string.digits + "()+,-.:=/ ")
#: Frontend device names in the order libvirt is asked for them (R4.3 ``Storage``).
FRONTENDS = (
    [f"xvd{c}" for c in string.ascii_lowercase[8:]]
    + [f"xvd{c}{d}" for c in string.ascii_lowercase for d in string.ascii_lowercase]
    + [f"xvd{c}" for c in string.ascii_lowercase[:8]]
)
#: A running qube's own disks (root, private, volatile, kernel modules).
SYSTEM_DISKS = ("xvda", "xvdb", "xvdc", "xvdd")

Event = tuple[str, str, dict[str, str]]


class LibvirtError(Exception):
    """Stands for ``libvirt.libvirtError``: libxl refused the attachment. Never reported."""


class QubeStates(Protocol):
    """The emulator's view of its qubes that device handling needs."""

    def exists(self, name: str) -> bool: ...

    def is_running(self, name: str) -> bool: ...


@dataclass(frozen=True)
class BlockDeviceSpec:
    """A block device a backend qube publishes (its ``/qubes-block-devices/<port>`` entry).

    Attributes:
        port_id: Device node under ``/dev`` with ``/`` as ``_``, e.g. ``sda`` or ``sda1``.
        serial: Model part of the description (``unknown`` if empty).
        name: Label part of the description (``unknown`` if empty).
        size: Size in bytes.
        mode: ``w`` or ``r`` (a read-only device can only be attached read-only).
        parent: Port id of the parent block device on the same backend (a partition's disk).
    """

    port_id: str
    serial: str = ""
    name: str = ""
    size: int = 0
    mode: str = "w"
    parent: str | None = None

    def __post_init__(self) -> None:
        if not PORT_ID_RE.match(self.port_id):
            raise ValueError(f"invalid block port id: {self.port_id!r}")
        if self.parent is not None and not PORT_ID_RE.match(self.parent):
            raise ValueError(f"invalid parent port id: {self.parent!r}")
        if self.mode not in ("w", "r") or self.size < 0:
            raise ValueError(f"invalid mode or size for {self.port_id!r}")
        if not set(self.serial + self.name) <= _DESC_CHARS:
            raise ValueError(f"invalid description characters for {self.port_id!r}")

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> BlockDeviceSpec:
        """Build from a fleet/state mapping (``port_id`` required, other keys optional)."""
        unknown = set(data) - {"port_id", "serial", "name", "size", "mode", "parent"}
        if unknown:
            raise ValueError(f"unknown block device keys: {sorted(unknown)}")
        parent = data.get("parent")
        return cls(
            port_id=str(data["port_id"]),
            serial=str(data.get("serial", "")),
            name=str(data.get("name", "")),
            size=int(str(data.get("size", 0))),
            mode=str(data.get("mode", "w")),
            parent=None if parent is None else str(parent),
        )

    @classmethod
    def from_fleet(cls, entry: Mapping[str, object]) -> BlockDeviceSpec:
        """Build from a fleet ``block_devices`` entry: ``port`` plus an optional QubesDB-style
        ``description`` (``MODEL (LABEL)``, underscores for spaces, as the block script
        writes it), ``size``, ``mode`` and ``parent``.

        The description is split the way R4.3 ``BlockDevice`` reads ``…/desc``: characters
        outside ``[A-Za-z0-9()+,-.:=_/ ]`` become ``_``; the text before the first space is
        the serial, the part inside the parentheses the name.
        """
        unknown = set(entry) - {"port", "description", "size", "mode", "parent"}
        if unknown:
            raise ValueError(f"unknown block device keys: {sorted(unknown)}")
        # qubesd decodes the QubesDB bytes as ASCII ignoring errors: non-ASCII just vanishes.
        ascii_desc = str(entry.get("description", "")).encode().decode("ascii", "ignore")
        desc = "".join(c if c in _DESC_CHARS or c == "_" else "_" for c in ascii_desc)
        model, _, label = desc.partition(" ")
        parent = entry.get("parent")
        return cls(
            port_id=str(entry["port"]),
            serial=model.replace("_", " ").strip(),
            name=label.replace("_", " ")[1:-1].strip() if label[1:-1] else "",
            size=int(str(entry.get("size", 0))),
            mode=str(entry.get("mode", "w")),
            parent=None if parent is None else str(parent),
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"port_id": self.port_id, "serial": self.serial}
        out.update(name=self.name, size=self.size, mode=self.mode)
        if self.parent is not None:
            out["parent"] = self.parent
        return out


@dataclass(frozen=True)
class Attachment:
    """One block device attached to a running frontend (a ``<disk>`` in its libvirt XML)."""

    backend: str
    port_id: str
    frontend: str
    options: tuple[tuple[str, str], ...] = field(default=())


class Spec(Protocol):
    """What every published device has: the port its backend names it by."""

    @property
    def port_id(self) -> str: ...


SpecT = TypeVar("SpecT", bound=Spec)


class ExposedDevices(Generic[SpecT]):
    """What every device class of the emulated dom0 shares (R4.3 ``device_protocol.py``):
    devices a backend publishes, visible only while it runs, and live attachments, which count
    only while their frontend runs. A class adds its wire format (``device_str``) and its own
    rules (block: assignments; USB: none)."""

    devclass: str

    def __init__(self, qubes: QubeStates) -> None:
        self.qubes = qubes
        self._exposed: dict[str, dict[str, SpecT]] = {}
        self._attached: list[Attachment] = []

    def device_str(self, backend: str, spec: SpecT) -> str:
        """``str(device)`` in events: ``<backend>:<port_id>:<device_id>``."""
        raise NotImplementedError

    def expose(self, backend: str, spec: SpecT) -> list[Event]:
        """Publish (hot-plug) a device; ``device-added`` fires if the backend runs."""
        ports = self._exposed.setdefault(backend, {})
        if spec.port_id in ports:
            raise ValueError(f"{backend} already exposes {spec.port_id}")
        ports[spec.port_id] = spec
        return self._announce(backend, [spec]) if self.qubes.is_running(backend) else []

    def _announce(self, backend: str, specs: list[SpecT]) -> list[Event]:
        if not specs:
            return []
        added = f"device-added:{self.devclass}"
        return [
            (backend, f"device-list-change:{self.devclass}", {}),
            *((backend, added, {"device": self.device_str(backend, s)}) for s in specs),
        ]

    def visible(self, backend: str) -> dict[str, SpecT]:
        """Devices qubesd can see: only a running backend's QubesDB is read."""
        return self._exposed.get(backend, {}) if self.qubes.is_running(backend) else {}

    def attachment_of(self, backend: str, port_id: str) -> Attachment | None:
        """The live attachment of a device: qubesd reads attachments from running qubes'
        libvirt XML, so one recorded for a frontend that is not running does not count."""
        for att in self._attached:
            if (att.backend, att.port_id) == (backend, port_id) and self.qubes.is_running(
                att.frontend
            ):
                return att
        return None

    def attached_to(self, frontend: str) -> list[Attachment]:
        if not self.qubes.is_running(frontend):
            return []
        return [a for a in self._attached if a.frontend == frontend]

    def forget(self, name: str) -> None:
        """A qube was removed: drop what it exposed and anything attached from or to it."""
        self._exposed.pop(name, None)
        self._attached = [a for a in self._attached if name not in (a.backend, a.frontend)]
