"""The gate's refusals: one root class, a stable vocabulary of codes, fixed messages.

Every failure in the gate is a :class:`GateError`. The request handler turns any caught
failure into the JSON refusal of its code; there is no path that ends in "allow by default".
Messages are fixed per code (or built only from values the caller already proved it may see),
so no dom0 exception text can reach an agent: the class name of an unexpected exception goes to
the audit log instead.
"""

from __future__ import annotations

from typing import ClassVar


class GateError(Exception):
    """Root of every refusal. ``code`` and ``message`` are what the agent sees."""

    code: ClassVar[str] = "failed"
    default_message: ClassVar[str] = "the request failed; see the dom0 audit log"

    def __init__(self, message: str | None = None, *, reason: str = "") -> None:
        self.message = message or self.default_message
        #: for the audit log and dom0 journal only, never sent to the agent
        self.reason = reason
        super().__init__(self.message)

    def to_reply(self) -> dict[str, object]:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


class InvalidInputError(GateError):
    """The payload is malformed; checked before any lookup, names a field, never a qube."""

    code = "invalid-input"
    default_message = "invalid input"


class NotFoundError(GateError):
    """Missing, out of scope, or not visible: byte-identical for all of them."""

    code = "not-found"
    default_message = "no such qube, or not yours"

    def __init__(self, *, reason: str = "") -> None:
        # Deliberately no message argument: every not-found is the same bytes.
        super().__init__(None, reason=reason)


class InsufficientTierError(GateError):
    """The qube is in scope but its effective tier is below what the operation needs."""

    code = "insufficient-tier"
    default_message = "this qube's tier does not allow that"


class NotAllowedError(GateError):
    """An invariant forbids it at every tier (tag writes, retargeting netvm, …)."""

    code = "not-allowed"
    default_message = "not allowed"


class BudgetExceededError(GateError):
    code = "budget-exceeded"
    default_message = "the request would exceed the operator's budget"


class ConsentDeniedError(GateError):
    code = "consent-denied"
    default_message = "the operator did not approve this request"


class ConsentTimeoutError(GateError):
    """No answer from the operator in time: a refusal, told apart from a "no"."""

    code = "consent-timeout"
    default_message = "the operator did not answer in time"


class WithdrawnError(GateError):
    """The caller hung up (its qrexec connection closed) before the request acted: wherever it
    still waited (a slot, the create lock, the operator), it is withdrawn and nothing is done.
    The agent is gone and will not read this; the code is for the audit log and for an
    operator who answers later."""

    code = "withdrawn"
    default_message = "the request was withdrawn"


class ConsentWithdrawnError(WithdrawnError):
    """The caller hung up (cancelled, or its qrexec connection closed) while the request waited
    for the operator: it is taken off the queue and never acted on. The agent is gone and will
    not read this; the code is for the audit log and for an operator who answers later."""

    default_message = "the request was withdrawn before the operator answered"


class ConflictError(GateError):
    code = "conflict"
    default_message = "a qube with that name already exists"


class InvalidStateError(GateError):
    code = "invalid-state"
    default_message = "the qube is not in a state that allows this"


class FailedError(GateError):
    code = "failed"


class RateLimitedError(GateError):
    """The calling qube sent more requests (or more refused requests) than its rate allows."""

    code = "rate-limited"
    default_message = "too many requests; try again later"


class UnavailableError(GateError):
    code = "unavailable"
    default_message = "qubes-mcp gate is unavailable"


class BusyError(GateError):
    """The calling qube already has as many requests open as its share allows (daemon.py).

    Each calling qube has its own share of the gate (requests being received, queued and
    acting), so this refusal only ever says something about the caller's own requests.
    """

    code = "busy"
    default_message = "too many requests from this qube at once; try again shortly"


class ConfigError(UnavailableError):
    """The operator's configuration is missing or malformed: the gate refuses everything.

    ``str()`` is the precise problem (for the operator); the agent sees only ``unavailable``.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(None, reason=problem)
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


#: every code, for documentation and for the MCP server's tests
CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        InvalidInputError,
        NotFoundError,
        InsufficientTierError,
        NotAllowedError,
        BudgetExceededError,
        ConsentDeniedError,
        ConsentTimeoutError,
        ConsentWithdrawnError,
        ConflictError,
        InvalidStateError,
        FailedError,
        UnavailableError,
        RateLimitedError,
        BusyError,
    )
)
