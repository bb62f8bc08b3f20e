"""The emulated ``qubes.Qubes`` object: global properties, labels, pools and the domains.

All state changes go through the methods here so that each fires the R4.3 event sequence
(``property-pre-set:*`` … ``property-set:*``, ``domain-tag-add:*``, ``domain-feature-set:*``,
``domain-add`` …) and the reactions R4.3's extensions attach to them (``guivm-``/``audiovm-``
tags, the ``servicevm`` feature, ``tag-created-vm-with``).
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.devices import BlockDevices
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import names
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.events import EventBus
from qubes_mcp.sim.qubesd.holder import PropertyHolder
from qubes_mcp.sim.qubesd.hypervisor import PowerHooks
from qubes_mcp.sim.qubesd.vm import Label, Qube
from qubes_mcp.sim.usb_devices import UsbDevices

log = logging.getLogger("qubes_mcp.sim.qubesd")

DEFAULT_LABELS = (
    (1, "0xcc0000", "red"),
    (2, "0xf57900", "orange"),
    (3, "0xedd400", "yellow"),
    (4, "0x73d216", "green"),
    (5, "0x555555", "gray"),
    (6, "0x3465a4", "blue"),
    (7, "0x75507b", "purple"),
    (8, "0x000000", "black"),
)
MAX_DEFAULT_LABEL = 8
MAX_QID = 10000
RECORD_LIMIT = 10000
GIB = 1024**3


@dataclass
class Pool:
    name: str
    driver: str
    dir_path: str
    size: int | None = None
    revisions_to_keep: int = 1
    ephemeral_volatile: bool = False

    def config(self) -> dict[str, object]:
        if self.driver == "linux-kernel":
            return {"name": self.name, "dir_path": self.dir_path, "driver": self.driver}
        return {
            "name": self.name,
            "dir_path": self.dir_path,
            "driver": self.driver,
            "revisions_to_keep": self.revisions_to_keep,
            "ephemeral_volatile": self.ephemeral_volatile,
        }


@dataclass
class Request:
    """One handled request, for tests (the ``record``)."""

    method: str
    arg: str
    src: str
    dest: str
    payload: bytes


@dataclass
class QubesApp(PropertyHolder):
    """All qubesd state of one emulated dom0."""

    paths: SimPaths
    props: dict[str, object] = field(default_factory=dict)
    domains: dict[str, Qube] = field(default_factory=dict)
    labels: dict[int, Label] = field(default_factory=dict)
    pools: dict[str, Pool] = field(default_factory=dict)
    bus: EventBus = field(default_factory=EventBus)
    #: the last handled requests, newest last (bounded: the emulator may run for days)
    record: deque[Request] = field(default_factory=lambda: deque(maxlen=RECORD_LIMIT))
    clone_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)
    autosave: bool = True
    _system_info: dict[str, Any] | None = None
    #: the sandboxes behind power operations (None: power is state only)
    hypervisor: PowerHooks | None = field(default=None, repr=False, compare=False)
    devices: BlockDevices = field(init=False)
    #: the ``usb`` class (R4.3's USB proxy extension; ``sim.usb_devices``)
    usb_devices: UsbDevices = field(init=False)
    #: the pid of a running qube's sandbox, when sandboxes are long-lived (admin.vm.Stats
    #: then reports that process tree's real memory and cpu figures; see ``stats.py``)
    sandbox_pid: Callable[[str], int | None] | None = None

    def __post_init__(self) -> None:
        self.bus.hooks.append(self._react)
        self.devices = BlockDevices(self)
        self.usb_devices = UsbDevices(self)

    # --- QubeStates (what sim.devices reads) ---------------------------------------------

    def exists(self, name: str) -> bool:
        return name in self.domains

    def is_running(self, name: str) -> bool:
        vm = self.domains.get(name)
        return vm is not None and vm.is_running()

    def fire_device_events(self, events: list[tuple[str, str, dict[str, str]]]) -> None:
        """Fire the events ``sim.devices`` returns (subjects by name)."""
        for subject, event, kw in events:
            vm = self.domains.get(subject)
            self.emit(vm, event, dict(kw), pre="-pre-" in event)

    # --- construction --------------------------------------------------------------------

    @classmethod
    def new(
        cls, paths: SimPaths, pool_size: int | None = None, pool_driver: str = "file"
    ) -> QubesApp:
        """A fresh app with dom0, the default labels and pools (``load_initial_values``:
        ``varlibqubes`` is ``file``, or ``file-reflink`` where the filesystem can reflink)."""
        app = cls(paths=paths)
        for index, color, name in DEFAULT_LABELS:
            app.labels[index] = Label(index, color, name)
        app.pools["varlibqubes"] = Pool("varlibqubes", pool_driver, "/var/lib/qubes", pool_size)
        app.pools["linux-kernel"] = Pool(
            "linux-kernel", "linux-kernel", "/var/lib/qubes/vm-kernels"
        )
        dom0 = Qube(app, "AdminVM", {"label": "black"})
        app.domains["dom0"] = dom0
        app.props["default_pool_kernel"] = "linux-kernel"
        return app

    # --- global properties ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return "Qubes"

    def __repr__(self) -> str:
        return "Qubes"

    @property
    def defs(self) -> Mapping[str, pdefs.PropDef]:
        return pdefs.APP_INDEX

    def resolve(self, name: str, value: object) -> Any:
        if pdefs.APP_INDEX[name].kind == "vm" and isinstance(value, str):
            return self.domains.get(value)
        return value

    # --- labels, pools, lookups ----------------------------------------------------------

    def label_by_name(self, name: str) -> Label:
        """``Qubes.get_label``: by name, then by index written in decimal."""
        for label in self.labels.values():
            if label.name == name:
                return label
        if name.isdigit() and int(name) in self.labels:
            return self.labels[int(name)]
        raise exc.QubesLabelNotFoundError(name)

    def connected_vms(self, netvm: Qube) -> list[Qube]:
        return [
            vm for vm in self.domains.values() if vm.has_prop("netvm") and vm.get("netvm") is netvm
        ]

    def vms_connected_to(self, netvm: Qube) -> set[Qube]:
        """Every qube whose network path goes through ``netvm`` (transitively)."""
        found: set[Qube] = set()
        todo = [netvm]
        while todo:
            for vm in self.connected_vms(todo.pop()):
                if vm not in found:
                    found.add(vm)
                    todo.append(vm)
        return found

    def new_qid(self) -> int:
        used = {vm.qid for vm in self.domains.values()}
        for qid in range(1, MAX_QID):
            if qid not in used:
                return qid
        raise LookupError("no free qid")

    def by_uuid(self, uuid: str) -> Qube | None:
        for vm in self.domains.values():
            if vm.uuid == uuid:
                return vm
        return None

    # --- events --------------------------------------------------------------------------

    def fire(self, subject: Qube | None, event: str, *, pre: bool = False, **kw: object) -> None:
        self.bus.emit(subject, event, kw, pre=pre)

    def emit(
        self, subject: Qube | None, event: str, kw: dict[str, object], *, pre: bool = False
    ) -> None:
        self.bus.emit(subject, event, kw, pre=pre)

    def _react(self, subject: Any, event: str, kw: dict[str, object]) -> None:
        """Reactions of R4.3's extensions (gui, audio, core_features, admin) and caches."""
        if event.startswith(
            (
                "domain-spawn",
                "domain-start",
                "domain-shutdown",
                "domain-tag-add:",
                "domain-tag-delete:",
            )
        ) or event in ("domain-add", "domain-delete"):
            self._system_info = None
        elif event.startswith(("property-set:", "property-reset:")):
            name = event.split(":", 1)[1]
            if name in (
                "template_for_dispvms",
                "default_dispvm",
                "label",
                "guivm",
                "relayvm",
                "transport_rpc",
            ):
                self._system_info = None
        elif event in ("domain-feature-set:internal", "domain-feature-delete:internal"):
            self._system_info = None
        if subject is None and event == "property-pre-set:default_netvm":
            from qubes_mcp.sim.qubesd import propwrite

            propwrite.default_netvm_pre_set(self, kw)
        elif subject is None and event == "property-set:default_netvm":
            from qubes_mcp.sim.qubesd import propwrite

            propwrite.default_netvm_set(self, kw)
        if subject is None and event in (
            "property-set:default_guivm",
            "property-set:default_audiovm",
        ):
            # ext/gui, ext/audio: every qube left at the default hears of its new value
            prop = event.split(":", 1)[1].removeprefix("default_")
            for vm in list(self.domains.values()):
                if vm.has_prop(prop) and vm.is_default(prop):
                    self.emit(vm, "property-set:" + prop, {**kw, "name": prop})
        if event == "property-pre-set:clockvm" and isinstance(kw.get("newvalue"), Qube):
            clockvm = kw["newvalue"]
            assert isinstance(clockvm, Qube)
            if "service.clocksync" not in clockvm.features:
                self.set_feature(clockvm, "service.clocksync", "1")
        if not isinstance(subject, Qube):
            return
        if event == "domain-feature-pre-set:preload-dispvm-max":
            from qubes_mcp.sim.qubesd import dispvm

            dispvm.check_preload_max(self, subject, str(kw["value"]), kw.get("oldvalue"))
        elif event in ("property-set:guivm", "property-reset:guivm"):
            self._sync_vm_tag(subject, "guivm")
        elif event in ("property-set:audiovm", "property-reset:audiovm"):
            self._sync_vm_tag(subject, "audiovm")
        elif event in ("property-set:relayvm", "property-reset:relayvm"):
            self._sync_vm_tag(subject, "relayvm")  # ext/relay.py (RemoteVM only)
        elif event in ("property-set:provides_network", "property-reset:provides_network"):
            if subject.get("provides_network"):
                self.set_feature(subject, "servicevm", "1")
                self.fire(subject, "property-reset:icon", name="icon")
            elif "servicevm" in subject.features:
                self.remove_feature(subject, "servicevm")
                self.fire(subject, "property-reset:icon", name="icon")
        elif event.startswith("domain-tag-add:created-by-"):
            # R4.3 looks the creator up unguarded: an unknown name is a KeyError (zero
            # bytes) after the tag was added
            creator = self.domains[str(kw["tag"]).partition("created-by-")[2]]
            for tag in creator.features.get("tag-created-vm-with", "").split():
                names.validate_tag(tag)
                self.add_tag(subject, tag)

    def _sync_vm_tag(self, vm: Qube, prop: str) -> None:
        for tag in [t for t in vm.tags if t.startswith(prop + "-")]:
            self.remove_tag(vm, tag)
        target = vm.get(prop, None)
        if target is not None:
            self.add_tag(vm, f"{prop}-{target.name}")

    # --- property writes (see :mod:`.propwrite`) ------------------------------------------

    def set_prop(self, holder: Qube | QubesApp, name: str, value: object) -> None:
        """``setattr`` with R4.3 semantics; ``value`` is what ``sanitize`` returned."""
        from qubes_mcp.sim.qubesd import propwrite

        propwrite.set_prop(self, holder, name, value)

    def reset_prop(self, holder: Qube | QubesApp, name: str) -> None:
        """``delattr``: back to the default, with the four reset events."""
        from qubes_mcp.sim.qubesd import propwrite

        propwrite.reset_prop(self, holder, name)

    # --- tags and features ---------------------------------------------------------------

    def add_tag(self, vm: Qube, tag: str) -> None:
        if tag in vm.tags:
            return
        vm.tags[tag] = None
        self.fire(vm, "domain-tag-add:" + tag, tag=tag)

    def remove_tag(self, vm: Qube, tag: str) -> None:
        del vm.tags[tag]  # KeyError for a missing tag, as ``Tags.remove``
        self.fire(vm, "domain-tag-delete:" + tag, tag=tag)

    def set_feature(self, vm: Qube, feature: str, value: str) -> None:
        kw: dict[str, object] = {"feature": feature, "value": value}
        if feature in vm.features:
            kw["oldvalue"] = vm.features[feature]
        self.emit(vm, "domain-feature-pre-set:" + feature, kw, pre=True)
        vm.features[feature] = value
        self.emit(vm, "domain-feature-set:" + feature, kw)

    def remove_feature(self, vm: Qube, feature: str) -> None:
        if feature not in vm.features:
            raise KeyError(feature)
        self.fire(vm, "domain-feature-pre-delete:" + feature, pre=True, feature=feature)
        del vm.features[feature]
        self.fire(vm, "domain-feature-delete:" + feature, feature=feature)

    # --- private volume storage ----------------------------------------------------------

    def create_private_dir(self, vm: Qube) -> None:
        self.paths.private_dir(vm.name).mkdir(parents=True, exist_ok=True)

    def remove_qube_dir(self, vm: Qube) -> None:
        qube_dir = self.paths.qube_dir(vm.name)
        parent = self.paths.qube_dir("x").parent.resolve()
        # a name passed validate_name, but check the path anyway before deleting a tree
        if qube_dir.resolve().parent == parent and qube_dir.exists():
            shutil.rmtree(qube_dir)

    # --- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        """Write the whole state atomically (see :mod:`.persist`)."""
        from qubes_mcp.sim.qubesd import persist

        persist.save(self)

    @classmethod
    def load(cls, paths: SimPaths) -> QubesApp:
        """Load the state file; everything starts Halted except dom0 (a reboot)."""
        from qubes_mcp.sim.qubesd import persist

        return persist.load(paths)

    # --- system info (internal.GetSystemInfo) --------------------------------------------

    def system_info(self) -> dict[str, Any]:
        """The ``internal.GetSystemInfo`` dict, cached; rebuilt after add/delete (10911)."""
        if self._system_info is None:
            self._system_info = {"domains": {vm.name: _info(vm) for vm in self.domains.values()}}
        return self._system_info


def _relay(vm: Qube) -> str | None:
    relay = vm.get("relayvm", None)
    return relay.name if isinstance(relay, Qube) else None


def _info(vm: Qube) -> dict[str, Any]:
    # R4.3 reads domain.label.icon unguarded: a qube whose label was reset breaks the
    # whole GetSystemInfo (AttributeError, an empty reply), and with it qrexec policy
    label = vm.get("label")
    default_dispvm = vm.get("default_dispvm", None) if vm.has_prop("default_dispvm") else None
    guivm = vm.get("guivm", None) if vm.has_prop("guivm") else None
    internal = vm.features.get("internal")
    return {
        "internal": internal,
        "tags": list(vm.tags),
        "type": vm.klass,
        "template_for_dispvms": bool(vm.get("template_for_dispvms", False))
        if vm.has_prop("template_for_dispvms")
        else False,
        "default_dispvm": default_dispvm.name if default_dispvm is not None else None,
        "icon": label.icon,
        "label": label.color,
        "guivm": guivm.name if guivm is not None else None,
        "relayvm": _relay(vm),
        "transport_rpc": vm.get("transport_rpc", None) or None,
        "power_state": vm.power,
        "uuid": vm.uuid,
    }
