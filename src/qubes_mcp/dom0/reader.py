"""Reading the facts a decision needs, fresh from qubesd, in a fixed order.

The first read about any named qube is ``admin.vm.tag.List``: it answers both "does it exist"
and "is it in scope" in one round trip, so a missing qube and an out-of-scope qube cost the
same single call and stop there (no timing or sequence difference between them). Only qubes
that are in scope (or the scope's dump sink) are read further.
"""

from __future__ import annotations

from collections.abc import Iterable

from qubes_mcp.dom0.admin import AdminClient, QubesdError
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
    """Fresh reads for one request. Not cached across requests: the fleet changes under us."""

    def __init__(self, client: AdminClient, scope: Scope) -> None:
        self.client = client
        self.scope = scope

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

    async def qube(self, name: str) -> QubeFacts | None:
        tags = await self.tags(name)
        if tags is None:
            return None
        if not (self.scope.is_enrolled(tags) or self.scope.is_dump_sink(tags)):
            return QubeFacts(name=name, klass="", state="", tags=tags)
        listed = await self.client.lines(name, "admin.vm.List")
        _, fields = parse_vm_list_line(listed[0]) if listed else ("", {})
        props = parse_getall(await self.client.call(name, "admin.vm.property.GetAll"))
        klass = fields.get("class", "")
        private = await self.volume_size(name, "private")
        footprint = private
        if klass in PERSISTENT_ROOT:
            footprint += await self.volume_size(name, "root")
        return QubeFacts(
            name=name,
            klass=klass,
            state=fields.get("state", ""),
            tags=tags,
            props=props,
            footprint=footprint,
            private_size=private,
        )

    async def all_names(self) -> list[tuple[str, dict[str, str]]]:
        return [
            parse_vm_list_line(line) for line in await self.client.lines("dom0", "admin.vm.List")
        ]

    async def scope_qubes(self) -> tuple[QubeFacts, ...]:
        """Every enrolled qube of the scope, fully read (for budgets)."""
        found = []
        for name, _ in await self.all_names():
            if name == "dom0":
                continue
            facts = await self.qube(name)
            if facts is not None and self.scope.is_enrolled(facts.tags):
                found.append(facts)
        return tuple(found)

    async def facts(self, names: Iterable[str], *, with_scope: bool = False) -> Facts:
        qubes: dict[str, QubeFacts | None] = {}
        for name in names:
            if name not in qubes:
                qubes[name] = await self.qube(name)
        scope = await self.scope_qubes() if with_scope else ()
        return Facts(qubes=qubes, scope_qubes=scope)
