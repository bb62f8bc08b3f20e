"""What the gate knows about the fleet when it decides: plain data, read fresh per request.

``QubeFacts`` is filled from qubesd and the enrolment registry by the reader in ``reader.py``;
the decision function sees only these values, never a socket. A name that does not exist maps
to ``None``. ``registered`` is the role the registry gives the name *under its current uuid*
(``Registry.role_of``), ``None`` otherwise; ``Scope.is_enrolled(tags, registered)`` is the one
membership predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace


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
    #: who registered it under this uuid (``operator`` or ``gate:<principal>``), from dom0's
    #: registry only; "" when not registered or not looked up (``Facts.with_registrars``)
    by: str = ""

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

    def with_registrars(self, registrar: Callable[[str, str], str | None]) -> Facts:
        """These facts with ``by`` filled in for every registered qube: ``registrar(name,
        uuid)`` is the registry's answer for that name under exactly that uuid
        (``Registry.registrar``), so a re-created name inherits nothing."""

        def fill(q: QubeFacts | None) -> QubeFacts | None:
            if q is None or q.registered is None:
                return q
            return replace(q, by=registrar(q.name, q.uuid) or "")

        return Facts(
            qubes={n: fill(q) for n, q in self.qubes.items()},
            scope_qubes=tuple(q for q in map(fill, self.scope_qubes) if q is not None),
        )
