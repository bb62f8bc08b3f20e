"""Reading the facts a decision needs, fresh from qubesd, in a fixed order.

The first read about any named qube is ``admin.vm.tag.List``: it answers "does it exist" in one
round trip, and a name the enrolment registry does not list stops there, so a missing qube and
an out-of-scope qube cost the same single call (no timing or sequence difference between
them). A registered name is read further (``admin.vm.List`` for its uuid, class and state):
it is in scope only if that uuid is the registered one and its tags agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.enrolment import Registry, RegistryFile
from qubes_mcp.dom0.facts import Facts, Prop, QubeFacts
from qubes_mcp.dom0.tiers import Scope

PERSISTENT_ROOT = frozenset({"TemplateVM", "StandaloneVM"})


def parse_getall(text: str) -> dict[str, Prop]:
    """``admin.vm.property.GetAll`` → {name: Prop}, undoing qubesd's ``\\n``/``\\\\`` escaping."""
    props: dict[str, Prop] = {}
    for line in text.split("\n"):
        if not line:
            continue
        name, _, rest = line.partition(" ")
        default, _, rest = rest.partition(" ")
        ptype, _, value = rest.partition(" ")
        value = value.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
        props[name] = Prop(default == "default=True", ptype.removeprefix("type="), value)
    return props


def property_value(get_reply: str) -> str:
    """The value of an ``admin.vm.property.Get`` reply (``default=… type=… <value>``)."""
    return get_reply.split(" ", 2)[-1]


def parse_vm_list_line(line: str) -> tuple[str, dict[str, str]]:
    name, _, rest = line.partition(" ")
    fields = dict(item.partition("=")[::2] for item in rest.split(" ") if "=" in item)
    return name, fields


class FleetReader:
    """Fresh reads for one request. Not cached across requests: the fleet changes under us.

    Who is in scope comes from the enrolment registry (``registry``: a snapshot, or the
    gate's ``RegistryFile``, read again when the file changes) *and* the live qube: its uuid
    must be the registered one and its tags must agree (``Scope.is_enrolled``). A name that is
    not registered costs one ``admin.vm.tag.List``, exactly like a missing name; listings and
    budgets walk the registered names only, so their cost does not depend on hidden qubes.

    There is deliberately no host-wide read here (no ``admin.vm.List`` on dom0): every read a
    principal's request makes is about a name it gave or a name of its scope, so neither the
    reply nor the time nor the sequence of qubesd calls depends on qubes outside the scope
    (``tests/security/test_listing_no_count_oracle.py``). Operator tools that must walk the
    host do so in their own modules (``enrolment.live_uuids``, ``install``).
    """

    def __init__(
        self, client: AdminClient, scope: Scope, registry: Registry | RegistryFile
    ) -> None:
        # the registry is required: a reader without one would see no qube in any scope, and a
        # caller that forgot it would describe or decide on empty facts (decision record 0010)
        self.client = client
        self.scope = scope
        self._source = registry
        self.registry = Registry()
        self.refresh()

    def refresh(self) -> Registry:
        """Take a new snapshot of the registry (once per request; long reads call it again)."""
        source = self._source
        self.registry = source.current() if isinstance(source, RegistryFile) else source
        return self.registry

    async def tags(self, name: str) -> frozenset[str] | None:
        try:
            return frozenset(await self.client.lines(name, "admin.vm.tag.List"))
        except QubesdError as exc:
            if exc.exc_class in ("QubesVMNotFoundError", "QubesValueError"):
                return None
            raise

    async def volume_size(self, name: str, volume: str) -> int:
        try:
            info = await self.client.lines(name, "admin.vm.volume.Info", volume)
        except QubesdError:
            return 0
        for line in info:
            key, _, value = line.partition("=")
            if key == "size" and value.isdigit():
                return int(value)
        return 0

    async def summary(self, name: str) -> QubeFacts | None:
        """Existence, tags and -- for a registered name -- class, state, uuid and the
        registration that uuid matches. ``None`` when the qube does not exist."""
        # the registry first, so that a missing and an unregistered name do the same work
        registry = self.registry
        entry = registry.entry(self.scope.prefix, name)
        tags = await self.tags(name)
        if tags is None:
            return None
        if entry is None:
            return QubeFacts(name=name, klass="", state="", tags=tags)
        try:
            listed = await self.client.lines(name, "admin.vm.List")
        except QubesdError as exc:
            if exc.exc_class in ("QubesVMNotFoundError", "QubesValueError"):
                return None  # removed between the two reads
            raise
        _, fields = parse_vm_list_line(listed[0]) if listed else ("", {})
        uuid = fields.get("uuid", "")
        role = registry.role_of(self.scope.prefix, name, uuid)
        if not (self.scope.is_enrolled(tags, role) or self.scope.is_dump_sink(tags, role)):
            return QubeFacts(name=name, klass="", state="", tags=tags)
        return QubeFacts(
            name=name,
            klass=fields.get("class", ""),
            state=fields.get("state", ""),
            tags=tags,
            registered=role,
            uuid=uuid,
        )

    async def in_scope(self, name: str) -> bool:
        """Whether ``name`` is enrolled (a member, not a dump) in this scope, read fresh."""
        q = await self.summary(name)
        return q is not None and self.scope.is_enrolled(q.tags, q.registered)

    async def qube(self, name: str, *, sizes: bool = True) -> QubeFacts | None:
        """Summary, properties and (with ``sizes``) the volume sizes of a registered name."""
        q = await self.summary(name)
        if q is None or q.registered is None:
            return q
        props = parse_getall(await self.client.call(name, "admin.vm.property.GetAll"))
        if not sizes:
            return replace(q, props=props)
        private = await self.volume_size(name, "private")
        footprint = private
        if q.klass in PERSISTENT_ROOT:
            footprint += await self.volume_size(name, "root")
        return replace(q, props=props, footprint=footprint, private_size=private)

    async def registered(self) -> list[QubeFacts]:
        """The registered names of the scope that are in it now (members and dump sinks),
        summarised; in registry order."""
        found = []
        for name in self.registry.entries(self.scope.prefix):
            q = await self.summary(name)
            if q is not None and q.registered is not None:
                found.append(q)
        return found

    async def scope_qubes(self) -> tuple[QubeFacts, ...]:
        """Every enrolled qube of the scope, fully read (for budgets)."""
        found = []
        for name in self.registry.members(self.scope.prefix):
            facts = await self.qube(name)
            if facts is not None and self.scope.is_enrolled(facts.tags, facts.registered):
                found.append(facts)
        return tuple(found)

    async def facts(
        self, names: Iterable[str], *, with_scope: bool = False, sizes: bool = True
    ) -> Facts:
        """The named qubes (``sizes=False``: without volume sizes, footprint 0), and with
        ``with_scope`` every enrolled qube of the scope, sizes included (for budgets)."""
        qubes: dict[str, QubeFacts | None] = {}
        for name in names:
            if name not in qubes:
                qubes[name] = await self.qube(name, sizes=sizes)
        scope = await self.scope_qubes() if with_scope else ()
        return Facts(qubes=qubes, scope_qubes=scope)
