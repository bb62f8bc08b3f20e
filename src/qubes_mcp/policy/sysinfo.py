"""The facts about the fleet that policy evaluation reads (``internal.GetSystemInfo``).

qubesd answers ``internal.GetSystemInfo`` with ``{"domains": {name: {...}}}``; the qrexec
policy daemon then adds a ``uuid:<uuid>`` alias for every domain (``qrexec/utils.py``
``get_system_info``), so that ``uuid:`` tokens and names are looked up the same way. This
module builds that view once, checks its shape, and never changes afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qubes_mcp.policy.errors import SystemInfoError

#: The only ``power_state`` that lets an ``autostart=no`` rule reach a qube (QX ``Allow``).
RUNNING = "Running"


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """One qube as policy sees it.

    Attributes:
        name: The qube's name (never a ``uuid:`` alias).
        klass: Its class, e.g. ``AppVM`` (``@type:`` matches it).
        tags: Its tags (``@tag:`` matches them).
        template_for_dispvms: Whether ``@dispvm:<name>`` may be started from it.
        default_dispvm: What ``@dispvm`` resolves to when this qube is the source.
        internal: Internal qubes are never offered in an ``ask`` dialog.
        power_state: ``Running``, ``Halted``, ...
        uuid: Its UUID without the ``uuid:`` prefix, if known.
        guivm: The qube that shows its dialogs, if any.
        relayvm: For a ``RemoteVM``, the local qube that relays to it.
        transport_rpc: For a ``RemoteVM``, the service that carries calls to it.
    """

    name: str
    klass: str
    tags: frozenset[str]
    template_for_dispvms: bool
    default_dispvm: str | None
    internal: bool
    power_state: str
    uuid: str | None
    guivm: str | None = None
    relayvm: str | None = None
    transport_rpc: str | None = None


def _opt_str(name: str, key: str, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise SystemInfoError(f"domain {name!r}: {key!r} must be a string or null")


def _domain_from_json(name: str, obj: object) -> DomainInfo:
    if not isinstance(obj, Mapping):
        raise SystemInfoError(f"domain {name!r}: entry must be an object")
    tags = obj.get("tags", [])
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
        raise SystemInfoError(f"domain {name!r}: 'tags' must be a list of strings")
    klass = obj.get("type")
    if not isinstance(klass, str):
        raise SystemInfoError(f"domain {name!r}: 'type' must be a string")
    flags = {}
    for key in ("template_for_dispvms", "internal"):
        value = obj.get(key, False)
        # qubesd sends the *feature* for "internal" (CA qubes/api/internal.py):
        # null when unset, else its string value; qrexec only tests its truth.
        if value is None or (key == "internal" and isinstance(value, str)):
            value = bool(value)
        if not isinstance(value, bool):
            raise SystemInfoError(f"domain {name!r}: {key!r} must be a boolean")
        flags[key] = value
    default_dispvm = _opt_str(name, "default_dispvm", obj.get("default_dispvm"))
    power_state = _opt_str(name, "power_state", obj.get("power_state")) or ""
    return DomainInfo(
        name=name,
        klass=klass,
        tags=frozenset(tags),
        template_for_dispvms=flags["template_for_dispvms"],
        # qubesd sends null for "no default"; an empty name cannot be a qube either.
        default_dispvm=default_dispvm or None,
        internal=flags["internal"],
        power_state=power_state,
        uuid=_opt_str(name, "uuid", obj.get("uuid")),
        guivm=_opt_str(name, "guivm", obj.get("guivm")),
        relayvm=_opt_str(name, "relayvm", obj.get("relayvm")),
        transport_rpc=_opt_str(name, "transport_rpc", obj.get("transport_rpc")),
    )


class SystemInfo:
    """An immutable index of qubes by name and by ``uuid:<uuid>``.

    Build it with :meth:`from_json`. ``info["work"]`` and ``info["uuid:…"]`` return the same
    :class:`DomainInfo`; iteration yields names only (never aliases).
    """

    __slots__ = ("_by_key", "_names")

    def __init__(self, domains: Mapping[str, DomainInfo]) -> None:
        self._names: tuple[str, ...] = tuple(domains)
        by_key: dict[str, DomainInfo] = dict(domains)
        for domain in domains.values():
            if domain.uuid is not None:
                by_key["uuid:" + domain.uuid] = domain
        self._by_key = by_key

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SystemInfo:
        """Build from the ``internal.GetSystemInfo`` JSON object.

        Args:
            obj: ``{"domains": {name: {"tags": [...], "type": "AppVM", ...}}}``.

        Returns:
            The index.

        Raises:
            SystemInfoError: When the shape is wrong (a missing ``domains`` object, a
                non-string type, non-boolean flags, a name that is itself a ``uuid:`` alias).
        """
        if not isinstance(obj, Mapping) or not isinstance(obj.get("domains"), Mapping):
            raise SystemInfoError("system info must be an object with a 'domains' object")
        domains: dict[str, DomainInfo] = {}
        for name, entry in obj["domains"].items():
            if not isinstance(name, str) or not name or name.startswith("uuid:"):
                raise SystemInfoError(f"invalid domain name {name!r}")
            domains[name] = _domain_from_json(name, entry)
        return cls(domains)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> DomainInfo:
        return self._by_key[key]

    def get(self, key: str) -> DomainInfo | None:
        """Return the qube named ``key`` (a name or ``uuid:<uuid>``), or None."""
        return self._by_key.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def domains(self) -> Iterator[DomainInfo]:
        """Yield every qube once, in the order qubesd listed them."""
        return (self._by_key[name] for name in self._names)
