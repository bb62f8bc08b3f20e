"""What the gate knows about the fleet when it decides: plain data, read fresh per request.

``QubeFacts`` is filled from qubesd and the enrolment registry by the reader in ``reader.py``;
the decision function sees only these values, never a socket. A name that does not exist maps
to ``None``. ``registered`` is the role the registry gives the name *under its current uuid*
(``Registry.role_of``), ``None`` otherwise; ``Scope.is_enrolled(tags, registered)`` is the one
membership predicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prop:
    """One property as ``admin.vm.property.GetAll`` reports it."""

    is_default: bool
    type: str
    value: str  # "" for None


@dataclass(frozen=True)
class QubeFacts:
    name: str
    klass: str
    state: str
    tags: frozenset[str]
    props: Mapping[str, Prop] = field(default_factory=dict)
    #: persistent bytes charged to the pool budget (private, plus root for templates/standalones)
    footprint: int = 0
    private_size: int = 0
    #: "member" / "dump" when registered in the reader's scope under this qube's uuid
    registered: str | None = None
    uuid: str = ""

    def prop(self, name: str) -> str:
        """The property's value, ``""`` when unset/None or not read."""
        p = self.props.get(name)
        return p.value if p is not None else ""

    def flag(self, name: str) -> bool:
        return self.prop(name) == "True"

    @property
    def running(self) -> bool:
        return self.state not in ("Halted", "")


@dataclass(frozen=True)
class Facts:
    """Everything one decision may look at."""

    #: every qube the request names (target, refs, property values, new names), or None
    qubes: Mapping[str, QubeFacts | None]
    #: for create paths: the enrolled qubes of the principal's scope (budget accounting)
    scope_qubes: tuple[QubeFacts, ...] = ()

    def get(self, name: str | None) -> QubeFacts | None:
        if name is None:
            return None
        if name in self.qubes:
            return self.qubes[name]
        return next((q for q in self.scope_qubes if q.name == name), None)
