"""A qrexec call request, sanitised the way qrexec-daemon sanitises it (§5.5 steps 1–2, §5.8).

Bytes outside the allowed charsets are replaced by ``_`` (not refused), exactly as
``sanitize_name`` does; an empty service name or one starting with ``+`` is refused, and so are
over-long fields. After :func:`sanitise_request` the fields are trusted names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qubes_mcp.sim.qrexec import wire

_TARGET_OK = re.compile(rb"[^A-Za-z0-9_.\-@:]")
_SERVICE_OK = re.compile(rb"[^A-Za-z0-9_.\-+]")
_SOURCE_NAME = re.compile(r"\A[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")
MAX_SERVICE_AND_ARG = 65000
MAX_TARGET = 63
NAME_MAX = 255


class RefusedError(Exception):
    """The call is refused before dispatch (policy, sanitising, or the target cannot run)."""


@dataclass(frozen=True)
class CallRequest:
    """A sanitised request: every field has passed the router's charset and length checks."""

    source: str
    target: str
    service: str
    arg: str

    @property
    def service_and_arg(self) -> str:
        return f"{self.service}+{self.arg}"


def sanitise_request(untrusted: wire.UntrustedRequest, vm_source: str | None) -> CallRequest:
    """Step 1–2 of §5.5: replace what qrexec-daemon replaces, refuse what it refuses.

    Raises:
        RefusedError: empty service, service starting with ``+``, over-long fields, or (on the
            control socket) a malformed source name.
    """
    untrusted_service = untrusted.untrusted_service
    if not untrusted_service or untrusted_service.startswith(b"+"):
        raise RefusedError("empty service name or service name starting with '+'")
    if len(untrusted_service) > MAX_SERVICE_AND_ARG:
        raise RefusedError("service name too long")
    service_and_arg = _SERVICE_OK.sub(b"_", untrusted_service).decode("ascii")
    target = _TARGET_OK.sub(b"_", untrusted.untrusted_target[:MAX_TARGET]).decode("ascii")
    if vm_source is not None:
        source = vm_source  # a qube never names its own source
    else:
        untrusted_source = untrusted.untrusted_source.decode("ascii", errors="replace")
        if not _SOURCE_NAME.match(untrusted_source):
            raise RefusedError("invalid source name")
        source = untrusted_source
    service, _, arg = service_and_arg.partition("+")
    if len(service) > NAME_MAX:
        raise RefusedError("service name too long")
    return CallRequest(source=source, target=target, service=service, arg=arg)
