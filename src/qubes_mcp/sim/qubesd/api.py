"""The Admin API call object and method registry (R4.3 ``qubes/api/__init__.py`` semantics).

A :class:`Call` is built from the four header fields the way R4.3 builds its handler object:
decode the source, then the destination (``uuid:`` or a valid name, else the exact qubesd
error), then the argument and method as ASCII, then look the method up. Method handlers are
registered once in :data:`METHODS` with :func:`method`; ``no_payload`` is the only generic
check R4.3 applies, everything else is the handler's own ``enforce`` (zero-byte refusal).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import names
from qubes_mcp.sim.qubesd.app import QubesApp
from qubes_mcp.sim.qubesd.vm import Qube

Handler = Callable[["Call"], Awaitable[str | None]]
SendEvent = Callable[[Any, str, dict[str, object]], None]

_UUID_PREFIX_RE = re.compile(rb"\Auuid:[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]*")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    handler: Handler
    no_payload: bool
    endpoint: str | None = None


#: method name -> spec, per socket ("admin" or "internal")
METHODS: dict[str, dict[str, MethodSpec]] = {"admin": {}, "internal": {}}


def method(
    name: str,
    *,
    no_payload: bool = False,
    endpoints: tuple[str, ...] | None = None,
    api: str = "admin",
) -> Callable[[Handler], Handler]:
    """Register a handler; ``{endpoint}`` in ``name`` expands over ``endpoints``."""

    def decorator(func: Handler) -> Handler:
        if endpoints is None:
            METHODS[api][name] = MethodSpec(name, func, no_payload)
        else:
            for ep in endpoints:
                full = name.format(endpoint=ep)
                METHODS[api][full] = MethodSpec(full, func, no_payload, ep)
        return func

    return decorator


def decode_vm(app: QubesApp, untrusted: bytes) -> Qube:
    """R4.3 ``decode_vm``: ``uuid:`` + 36 lowercase hex, or a valid existing name."""
    name = untrusted.decode("ascii", "strict")
    if untrusted.startswith(b"uuid:"):
        if len(untrusted) != 41 or not _UUID_PREFIX_RE.match(untrusted):
            raise exc.QubesVMInvalidUUIDError(name[5:])
        vm = app.by_uuid(name[5:])
    else:
        names.validate_name(name)
        vm = app.domains.get(name)
    if vm is None:
        raise exc.QubesVMNotFoundError(name)
    return vm


@dataclass
class Call:
    """One Admin API request, decoded (``AbstractQubesAPI.__init__``)."""

    app: QubesApp
    src: Qube
    dest: Qube
    arg: str
    method: str
    spec: MethodSpec
    send_event: SendEvent | None = None
    cancellable: bool = False
    filters: list[Callable[[Any], bool]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        app: QubesApp,
        api: str,
        *,
        src: bytes,
        method_name: bytes,
        dest: bytes,
        arg: bytes,
        send_event: SendEvent | None = None,
    ) -> Call:
        src_vm = decode_vm(app, src)
        dest_vm = decode_vm(app, dest)
        arg_text = arg.decode("ascii")
        meth = method_name.decode("ascii")
        spec = METHODS[api].get(meth)
        if spec is None:
            raise exc.ProtocolError(f"no such method: {meth!r}")
        return cls(app, src_vm, dest_vm, arg_text, meth, spec, send_event)

    async def execute(self, untrusted_payload: bytes) -> str | None:
        if self.spec.no_payload and untrusted_payload != b"":
            raise exc.ProtocolError("unexpected payload")
        self.untrusted_payload = untrusted_payload
        return await self.spec.handler(self)

    #: the request payload, as the caller sent it; each handler sanitises what it uses
    untrusted_payload: bytes = b""

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint or ""

    @staticmethod
    def enforce(predicate: bool) -> None:
        """R4.3 ``enforce``: a refusal without a message (zero bytes on the wire)."""
        if not predicate:
            raise exc.PermissionDenied()

    def permission(self, **kwargs: object) -> list[Callable[[Any], bool]]:
        """``fire_event_for_permission``: vetoes and filters of ``qubes/ext/admin.py``."""
        from qubes_mcp.sim.qubesd import permission

        return permission.check(self, kwargs)

    def filtered(self, items: list[Any], **kwargs: object) -> list[Any]:
        for selector in self.permission(**kwargs):
            items = [item for item in items if selector(item)]
        return items

    def save(self) -> None:
        if self.app.autosave:
            self.app.save()


def validate_size(untrusted_size: bytes, allow_negative: bool = False) -> int:
    """R4.3 ``validate_size``: ASCII digits, < 20 of them, no leading zero."""
    coefficient = 1
    if allow_negative and untrusted_size.startswith(b"-"):
        coefficient = -1
        untrusted_size = untrusted_size[1:]
    if not untrusted_size.isdigit():
        raise exc.ProtocolError("Size must be ASCII digits (only)")
    if len(untrusted_size) >= 20:
        raise exc.ProtocolError("Sizes limited to 19 decimal digits")
    if untrusted_size[0] == 48 and untrusted_size != b"0":
        raise exc.ProtocolError("Spurious leading zeros not allowed")
    return int(untrusted_size) * coefficient
