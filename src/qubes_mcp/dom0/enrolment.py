"""dom0's registry of enrolled qubes: which names are in which scope, under which uuid.

Enrolment is by name, recorded here, in dom0 (decision record 0010). Tags alone cannot say
who is in scope, because Qubes copies them: a disposable inherits every tag of its disposable
template (R4.3 ``DispVM.__init__``) and ``qvm-clone`` copies every tag but ``created-by-*``.
So a qube is in a scope only when it is registered here under its *current* uuid **and**
carries the scope's tag (``tiers.Scope.is_enrolled``); a name the operator removed and
re-created has a new uuid and inherits nothing.

The file ``<state_dir>/enrolment.json``::

    {"version": 1, "scopes": {"ai": {"ai-dev": {"uuid": "…", "role": "member",
        "class": "AppVM", "by": "operator", "at": "2026-11-29T12:00:00Z"}}}}

``role`` is ``member`` or ``dump``; ``class`` is recorded because it never changes for a uuid
and the policy needs it (only templates may call the updates proxy or sync menus); ``by`` is
``operator`` or ``gate:<principal>``.

The same file keeps the *lab links* (``link.open``; decision record 0018) under ``links``::

    "links": [{"id": "…16 hex…", "scope": "ai", "client": "ai-attacker",
        "server": "ai-victim", "port": 8080, "by": "gate:ai-agent", "at": "…"}]

A link lives only as long as both its qubes stay registered members of its scope under the
uuid they had when it was opened: any change that unregisters either, or registers the name
again under another uuid, drops it in the same commit (``Registry._with``). So the links and
the policy lines they render are written together, atomically, like every registration.

Every change goes through ``commit``: under an exclusive lock it re-reads the file, applies
the change, renders the policy for the new registry and validates it together with every other
file of the policy directory, and only then writes the registry and the policy (each
atomically, registry first: for a moment the gate may hide a qube the policy still names, never
the reverse). A policy that does not validate writes nothing and raises, so the caller refuses.

Entry points:

- the gate: ``Context.enter_scope(name)`` as the LAST step of a birth (it reads the new qube's
  uuid and class and registers it with ``by="gate:<principal>"``), ``Context.leave_scope(name)``
  when it removes a qube; both call ``enrol``/``unenrol`` here;
- the operator: ``qubes-mcp-admin enrol|unenrol|install`` (``cli_gate.py``, ``install.py``);
- ``reconcile``: drops the entries whose qube is gone or has another uuid (gate start, and
  before each listing).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.errors import GateError, NotFoundError, UnavailableError
from qubes_mcp.dom0.fsutil import atomic_write, locked
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.tiers import DUMP, MEMBER, SCOPE_RE, Scope

REGISTRY_NAME = "enrolment.json"
_LOCK_NAME = ".enrolment.lock"
_ROLES = (MEMBER, DUMP)
LINK_ID_RE = re.compile(r"\A[0-9a-f]{16}\Z")


class RegistryError(UnavailableError):
    """The registry cannot be read: every request is refused until the operator fixes it."""

    def __init__(self, why: str) -> None:
        super().__init__(None, reason=f"enrolment registry: {why}")


class PolicyRefusedError(GateError):
    """The policy rendered for a registry change did not validate; nothing was written.

    ``reason`` names the file and line (for the operator and the dom0 journal only)."""

    code = "failed"
    default_message = "the generated policy would not validate; nothing was changed"


@dataclass(frozen=True)
class Entry:
    uuid: str
    role: str
    klass: str
    by: str
    at: str

    def to_json(self) -> dict[str, str]:
        return {
            "uuid": self.uuid,
            "role": self.role,
            "class": self.klass,
            "by": self.by,
            "at": self.at,
        }


@dataclass(frozen=True)
class Link:
    """A lab link: ``client`` may call ``qubes.ConnectTCP+PORT`` on ``server`` (decision 0018)."""

    id: str
    scope: str
    client: str
    server: str
    port: int
    by: str
    at: str

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "scope": self.scope,
            "client": self.client,
            "server": self.server,
            "port": self.port,
            "by": self.by,
            "at": self.at,
        }


def _link(raw: object) -> Link:
    if not isinstance(raw, dict):
        raise RegistryError("a link is not an object")
    texts = {k: raw.get(k) for k in ("id", "scope", "client", "server", "by", "at")}
    port = raw.get("port")
    if (
        not all(isinstance(v, str) for v in texts.values())
        or not LINK_ID_RE.match(str(texts["id"]))
        or not SCOPE_RE.match(str(texts["scope"]))
        or not _registrable(texts["client"])
        or not _registrable(texts["server"])
        or texts["client"] == texts["server"]
        or type(port) is not int
        or not 1 <= port <= 65535
    ):
        raise RegistryError("a link lacks id/scope/client/server/port/by/at")
    return Link(
        str(texts["id"]),
        str(texts["scope"]),
        str(texts["client"]),
        str(texts["server"]),
        port,
        str(texts["by"]),
        str(texts["at"]),
    )


def _entry(raw: object) -> Entry:
    if not isinstance(raw, dict):
        raise RegistryError("an entry is not an object")
    values = {k: raw.get(k) for k in ("uuid", "role", "class", "by", "at")}
    if not all(isinstance(v, str) for v in values.values()) or values["role"] not in _ROLES:
        raise RegistryError("an entry lacks uuid/role/class/by/at")
    return Entry(
        str(values["uuid"]),
        str(values["role"]),
        str(values["class"]),
        str(values["by"]),
        str(values["at"]),
    )


class Registry:
    """One immutable snapshot of the registry. Changes return a new snapshot."""

    def __init__(
        self,
        scopes: Mapping[str, Mapping[str, Entry]] | None = None,
        links: Iterable[Link] = (),
    ) -> None:
        self._scopes: Mapping[str, Mapping[str, Entry]] = MappingProxyType(
            {s: MappingProxyType(dict(sorted(e.items()))) for s, e in (scopes or {}).items()}
        )
        self._links: tuple[Link, ...] = tuple(sorted(links, key=lambda k: k.id))

    @classmethod
    def load(cls, path: Path) -> Registry:
        """The registry in ``path``; a missing file is an empty registry.

        Raises:
            RegistryError: the file exists but is not a registry (fail closed).
        """
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise RegistryError(type(exc).__name__) from None
        if not isinstance(raw, dict) or raw.get("version") != 1:
            raise RegistryError("unknown format")
        scopes = raw.get("scopes")
        if not isinstance(scopes, dict):
            raise RegistryError("no scopes")
        out: dict[str, dict[str, Entry]] = {}
        for scope, entries in scopes.items():
            if not isinstance(scope, str) or not SCOPE_RE.match(scope):
                raise RegistryError("bad scope name")
            if not isinstance(entries, dict):
                raise RegistryError("a scope is not an object")
            for name in entries:
                if not _registrable(name):
                    raise RegistryError("a registered name is not a qube name")
            out[scope] = {str(name): _entry(e) for name, e in entries.items()}
        links = raw.get("links", [])
        if not isinstance(links, list):
            raise RegistryError("links is not a list")
        parsed = [_link(k) for k in links]
        if len({k.id for k in parsed}) != len(parsed):
            raise RegistryError("two links have one id")
        return cls(out, parsed)

    def to_bytes(self) -> bytes:
        data = {
            "version": 1,
            "scopes": {
                s: {n: e.to_json() for n, e in entries.items()}
                for s, entries in sorted(self._scopes.items())
                if entries
            },
        }
        if self._links:
            data["links"] = [k.to_json() for k in self._links]
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    def scopes(self) -> list[str]:
        return sorted(s for s, e in self._scopes.items() if e)

    def entries(self, scope: str) -> Mapping[str, Entry]:
        return self._scopes.get(scope, MappingProxyType({}))

    def entry(self, scope: str, name: str) -> Entry | None:
        return self.entries(scope).get(name)

    def members(self, scope: str) -> dict[str, Entry]:
        return {n: e for n, e in self.entries(scope).items() if e.role == MEMBER}

    def dumps(self, scope: str) -> dict[str, Entry]:
        return {n: e for n, e in self.entries(scope).items() if e.role == DUMP}

    def role_of(self, scope: str, name: str, uuid: str) -> str | None:
        """The registered role of ``name`` if it is registered under exactly ``uuid``.

        The one place where a registration is matched against the live qube: the reader reads
        the uuid with the facts and passes the answer to ``Scope.is_enrolled``.
        """
        found = self.entry(scope, name)
        return found.role if found is not None and uuid and found.uuid == uuid else None

    def registrar(self, scope: str, name: str, uuid: str) -> str | None:
        """Who registered ``name`` (``by``) if it is registered under exactly ``uuid``."""
        found = self.entry(scope, name)
        return found.by if found is not None and uuid and found.uuid == uuid else None

    def enrolled(
        self, scope: str, name: str, uuid: str, klass: str, *, role: str = MEMBER, by: str
    ) -> Registry:
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}")
        if not _registrable(name):
            raise ValueError(f"cannot enrol {name!r}")
        if not uuid:
            raise ValueError("a registration needs the qube's uuid")
        entry = Entry(uuid, role, klass, by, _now())
        return self._with(scope, {**self.entries(scope), name: entry})

    def unenrolled(self, scope: str, name: str) -> Registry:
        return self._with(scope, {n: e for n, e in self.entries(scope).items() if n != name})

    def _with(self, scope: str, entries: Mapping[str, Entry]) -> Registry:
        """The registry with ``scope``'s entries replaced. A link of that scope survives only
        if both its qubes are still members there under the same uuid: unregistering either
        end, or registering its name again for another qube, closes the link in the same
        commit (so no policy line outlives the qubes it names)."""
        old = self.entries(scope)

        def same(name: str) -> bool:
            before, after = old.get(name), entries.get(name)
            return (
                before is not None
                and after is not None
                and after.role == MEMBER
                and before.uuid == after.uuid
            )

        links = [k for k in self._links if k.scope != scope or (same(k.client) and same(k.server))]
        return Registry({**self._scopes, scope: entries}, links)

    # -- lab links (decision record 0018) ------------------------------------------------------

    def links(self, scope: str | None = None) -> tuple[Link, ...]:
        """The links of ``scope`` (every link when ``None``), ordered by id."""
        return tuple(k for k in self._links if scope is None or k.scope == scope)

    def link(self, scope: str, client: str, server: str, port: int) -> Link | None:
        return next(
            (
                k
                for k in self.links(scope)
                if (k.client, k.server, k.port) == (client, server, port)
            ),
            None,
        )

    def linked(self, link: Link) -> Registry:
        """The registry with ``link`` added (replacing one of the same id).

        Raises:
            ValueError: an end is not a registered member of the link's scope, or both ends are
                one qube, or the port is out of range.
        """
        members = self.members(link.scope)
        if link.client == link.server or not 1 <= link.port <= 65535:
            raise ValueError("a link joins two different qubes on a port 1..65535")
        if link.client not in members or link.server not in members:
            raise ValueError("both ends of a link must be registered members of its scope")
        if not LINK_ID_RE.match(link.id):
            raise ValueError("bad link id")
        kept = [k for k in self._links if k.id != link.id]
        return Registry(self._scopes, [*kept, link])

    def unlinked(self, link_id: str) -> Registry:
        return Registry(self._scopes, [k for k in self._links if k.id != link_id])

    def unlinked_qube(self, scope: str, name: str) -> Registry:
        """The registry without the links of ``scope`` that ``name`` is an end of."""
        return Registry(
            self._scopes,
            [k for k in self._links if k.scope != scope or name not in (k.client, k.server)],
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Registry) and self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]


def _registrable(name: object) -> bool:
    """A qube name that is not dom0: the only strings that may become policy tokens."""
    return is_valid_qube_name(name) and name != "dom0"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_link(scope: str, client: str, server: str, port: int, *, by: str) -> Link:
    """A new link with a fresh random id (also the marker of its listener in the client)."""
    return Link(secrets.token_hex(8), scope, client, server, port, by, _now())


def lost_links(old: Registry, new: Registry) -> list[Link]:
    """The links ``old`` had and ``new`` has not (closed by a registry change)."""
    kept = {k.id for k in new.links()}
    return [k for k in old.links() if k.id not in kept]


def registry_path(state_dir: Path) -> Path:
    return state_dir / REGISTRY_NAME


class RegistryFile:
    """The gate's view of the file: re-read when it was replaced (cheap per request).

    A replacement shows as a new (inode, mtime, size); since an inode number can be reused
    and timestamps are coarse, a file modified in the last two seconds is always re-read."""

    _SETTLED_NS = 2_000_000_000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._snapshot = Registry()

    def current(self) -> Registry:
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            settled = time.time_ns() - st.st_mtime_ns > self._SETTLED_NS
        except FileNotFoundError:
            key, settled = (0, 0, 0), True
        if key != self._key or not settled:
            self._snapshot = Registry.load(self.path)
            self._key = key
        return self._snapshot


Change = Callable[[Registry], Registry]


def commit(
    state_dir: Path,
    policy_dir: Path,
    change: Change,
    render: Callable[[Registry], str],
    *,
    check: Callable[[str], None] | None = None,
    write: Callable[[str], None] | None = None,
) -> Registry:
    """Apply ``change`` to the registry and install the policy it renders, or nothing.

    ``render`` turns a registry into the text of the generated policy file; it is validated
    with our engine together with the other files of ``policy_dir`` before anything is
    written (``render.stage_policy``), then by ``check`` if given (``install`` passes Qubes'
    ``qubes-policy-lint``; it raises ``PolicyRefusedError``). ``write`` replaces the file
    instead of our atomic write (``install`` passes ``qubes-policy --replace``); if it raises,
    the registry is put back.

    Raises:
        PolicyRefusedError: the policy does not validate (nothing written).
        RegistryError: the registry on disk is unreadable.
    """
    from qubes_mcp.dom0.render import POLICY_NAME, stage_policy
    from qubes_mcp.policy import PolicyError

    path = registry_path(state_dir)
    with locked(state_dir, _LOCK_NAME), locked(policy_dir):
        old = Registry.load(path)
        new = change(old)
        try:
            text = stage_policy(policy_dir, render(new))
        except PolicyError as exc:
            raise PolicyRefusedError(reason=str(exc)) from None
        if check is not None:
            check(text)
        if new != old:
            atomic_write(path, new.to_bytes(), 0o600)
        try:
            if write is not None:
                write(text)
            else:
                atomic_write(policy_dir / POLICY_NAME, text.encode(), 0o644)
        except OSError:
            if new != old:
                atomic_write(path, old.to_bytes(), 0o600)
            raise
    return new


def stale(registry: Registry, live: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(scope, name, uuid)`` of every registration whose qube is gone or has another uuid
    (``live``: name → uuid of every existing qube)."""
    return [
        (scope, name, e.uuid)
        for scope in registry.scopes()
        for name, e in registry.entries(scope).items()
        if live.get(name) != e.uuid
    ]


def drop(entries: Iterable[tuple[str, str, str]]) -> Change:
    """A change that removes each ``(scope, name, uuid)`` -- only if it is still registered
    under that uuid (a concurrent re-enrolment of the same name is kept)."""
    triples = list(entries)

    def apply(registry: Registry) -> Registry:
        for scope, name, uuid in triples:
            found = registry.entry(scope, name)
            if found is not None and found.uuid == uuid:
                registry = registry.unenrolled(scope, name)
        return registry

    return apply


# -- the entry points that talk to qubesd and commit (gate and operator CLI) ------------------


def _render_for(config: GateConfig) -> Callable[[Registry], str]:
    from qubes_mcp.dom0.render import render_policy

    return lambda registry: render_policy(config, registry)


async def commit_change(config: GateConfig, change: Change) -> Registry:
    """``commit`` for ``config``'s state and policy directories, off the event loop."""
    paths = config.paths
    return await asyncio.to_thread(
        commit, paths.state_dir, paths.policy_dir, change, _render_for(config)
    )


async def live_identity(admin: AdminClient, name: str) -> tuple[str, str] | None:
    """``(uuid, class)`` of the qube called ``name`` now, or ``None`` if there is none."""
    if not _registrable(name):
        return None
    try:
        listed = await admin.lines(name, "admin.vm.List")
    except QubesdError as exc:
        if exc.exc_class in ("QubesVMNotFoundError", "QubesValueError"):
            return None
        raise
    for line in listed:
        got, _, rest = line.partition(" ")
        fields = dict(item.partition("=")[::2] for item in rest.split(" ") if "=" in item)
        if got == name and fields.get("uuid"):
            return fields["uuid"], fields.get("class", "")
    return None


async def enrol_live(
    config: GateConfig,
    admin: AdminClient,
    scope: Scope,
    name: str,
    *,
    by: str,
    role: str = MEMBER,
    close_links: bool = False,
) -> Registry:
    """Register ``name`` under its current uuid and class, and install the new policy;
    ``close_links`` drops its lab links in the same commit (a tier below net, decision 0018).

    Raises:
        NotFoundError: no such qube (or dom0).
        PolicyRefusedError: the policy would not validate; nothing registered.
    """
    identity = await live_identity(admin, name)
    if identity is None:
        raise NotFoundError(reason=f"no such qube: {name}")
    uuid, klass = identity

    def change(r: Registry) -> Registry:
        enrolled = r.enrolled(scope.prefix, name, uuid, klass, role=role, by=by)
        return enrolled.unlinked_qube(scope.prefix, name) if close_links else enrolled

    return await commit_change(config, change)


async def unenrol_name(config: GateConfig, scope: Scope, name: str) -> Registry:
    return await commit_change(config, lambda r: r.unenrolled(scope.prefix, name))


async def live_uuids(admin: AdminClient) -> dict[str, str]:
    """name → uuid of every qube on the host (reconcile and operator tools only)."""
    out = {}
    for line in await admin.lines("dom0", "admin.vm.List"):
        name, _, rest = line.partition(" ")
        fields = dict(item.partition("=")[::2] for item in rest.split(" ") if "=" in item)
        out[name] = fields.get("uuid", "")
    return out


async def reconcile(config: GateConfig, admin: AdminClient) -> list[tuple[str, str, str]]:
    """Drop every registration whose qube is gone or has another uuid; re-render the policy
    when anything was dropped. Returns what was dropped."""
    registry = Registry.load(registry_path(config.paths.state_dir))
    gone = stale(registry, await live_uuids(admin))
    if gone:
        await commit_change(config, drop(gone))
    return gone
