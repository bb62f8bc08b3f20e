"""One emulated qube: properties, tags, features, volumes, power state.

Values a caller set are kept in :attr:`Qube.props`; everything else comes from the default
functions of :mod:`.props`, so "default=True" in a Get means exactly "not in ``props``", as
``property_is_default`` does in qubesd. VM-valued properties are stored by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qubes_mcp.sim.firewall import Firewall
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.holder import PropertyHolder

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import QubesApp

_NO_DEFAULT: Any = object()

DOM0_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass
class Label:
    index: int
    color: str
    name: str

    def __str__(self) -> str:
        return self.name

    @property
    def icon(self) -> str:
        return "appvm-" + self.name


@dataclass
class Volume:
    """One volume; ``source`` and ``path`` are derived when ``snap_on_start`` is set.

    ``ephemeral`` is ``None`` until set (R4.3 ``Volume._ephemeral``): the value then comes from
    the volume's kind and its pool's ``ephemeral_volatile``, and a new disposable copies it
    from its template only when it was set.
    """

    name: str
    pool: str
    size: int
    rw: bool = True
    save_on_stop: bool = False
    snap_on_start: bool = False
    revisions_to_keep: int = 0
    ephemeral: bool | None = None
    usage: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Qube(PropertyHolder):
    """A qube of class ``klass`` (AdminVM, TemplateVM, AppVM, DispVM, StandaloneVM)."""

    def __init__(self, app: QubesApp, klass: str, props: dict[str, object]) -> None:
        self.app = app
        self.klass = klass
        self.props: dict[str, object] = props
        self.tags: dict[str, None] = {}
        self.features: dict[str, str] = {}
        self.volumes: dict[str, Volume] = {}
        self.notes = ""
        self.firewall = Firewall.default()
        # AdminVM and RemoteVM report Running always (is_running() is a constant)
        self.power = "Running" if klass in ("AdminVM", "RemoteVM") else "Halted"
        self.start_time: str | None = None
        self.xid = 0 if klass == "AdminVM" else -1

    # --- identity ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.get("name"))

    @property
    def qid(self) -> int:
        return int(str(self.get("qid")))

    @property
    def uuid(self) -> str:
        return str(self.get("uuid"))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        """R4.3 ``BaseVM.__repr__``, which error messages embed (``Invalid value None for
        property 'template' of <AppVM at 0x… name='work' qid=5 autostart=False …>``): the
        class, the object's address, name, qid, then every other property in
        ``property_list`` order as ``name=str(value)``, skipping those without a value."""
        parts = []
        for prop in pdefs.listed(self.defs):
            if prop.name in ("name", "qid"):
                continue
            try:
                value = self.get(prop.name)
            except AttributeError:
                continue
            parts.append(f"{prop.name}={value}")
        return (
            f"<{self.klass} at {id(self):#x} name={self.name!r} qid={self.qid!r} {' '.join(parts)}>"
        )

    # --- properties ----------------------------------------------------------------------

    @property
    def defs(self) -> dict[str, pdefs.PropDef]:
        return pdefs.CLASS_INDEX[self.klass]

    def resolve(self, name: str, value: object) -> Any:
        """Typed value: a :class:`Qube` for VM properties, a :class:`Label` for ``label``."""
        prop = self.defs.get(name)
        if prop is not None and prop.kind == "vm" and isinstance(value, str):
            return self.app.domains.get(value)
        if name == "label" and isinstance(value, str):
            return self.app.label_by_name(value)
        return value

    def template_or_none(self) -> Qube | None:
        if not self.has_prop("template"):
            return None
        tpl = self.get("template", None)
        return tpl if isinstance(tpl, Qube) else None

    def label_or_none(self) -> Label | None:
        label = self.get("label", None)
        return label if isinstance(label, Label) else None

    # --- features ------------------------------------------------------------------------

    def check_feature(self, attr: str | None, feature: str, default: object = _NO_DEFAULT) -> Any:
        """``Features._recursive_check`` along ``attr`` (``template``/``netvm``), then dom0
        when ``attr`` is None or ends in ``+adminvm``."""
        check_adminvm = attr is None or attr.endswith("+adminvm")
        attr = attr.split("+")[0] if attr else None
        subject: Qube | None = self
        while subject is not None:
            if feature in subject.features:
                return subject.features[feature]
            if not attr or not subject.has_prop(attr):
                break
            nxt = subject.get(attr, None)
            subject = nxt if isinstance(nxt, Qube) else None
        if check_adminvm:
            dom0 = self.app.domains.get("dom0")
            if dom0 is not None and feature in dom0.features:
                return dom0.features[feature]
        if default is not _NO_DEFAULT:
            return default
        raise KeyError(feature)

    # --- power ---------------------------------------------------------------------------

    def is_running(self) -> bool:
        return self.power not in ("Halted",)

    def is_halted(self) -> bool:
        return self.power == "Halted"

    def is_paused(self) -> bool:
        return self.power == "Paused"

    # --- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "klass": self.klass,
            "props": self.props,
            "tags": list(self.tags),
            "features": self.features,
            "volumes": {n: v.to_json() for n, v in self.volumes.items()},
            "notes": self.notes,
            "firewall": self.firewall.to_json(),
        }


__all__ = ["DOM0_UUID", "Label", "Qube", "Volume"]
