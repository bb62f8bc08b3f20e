"""What a handler gets: the decided request, the clients it may use, and where to note details.

Also the one place that maps qubesd's exceptions to the gate's vocabulary: a power-state
complaint becomes ``invalid-state`` with a fixed message, anything else ``failed``; the class
name is kept for the audit log, qubesd's message never travels to the agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.config import GateConfig, Principal
from qubes_mcp.dom0.decide import Verdict
from qubes_mcp.dom0.errors import FailedError, GateError, InvalidStateError
from qubes_mcp.dom0.facts import Facts
from qubes_mcp.dom0.reader import FleetReader

_STATE_MESSAGES = {
    "QubesVMNotHaltedError": "the qube must be halted first",
    "QubesVMNotStartedError": "the qube is not running",
    "QubesVMNotRunningError": "the qube is not running",
    "QubesVMNotPausedError": "the qube is not paused",
    "QubesVMInUseError": "the qube is in use (another qube depends on it)",
    "QubesVMShutdownTimeoutError": "the qube did not shut down in time",
    "DeviceAlreadyAttached": "the device is already attached",
    "DeviceNotAssigned": "the device is not attached there",
}


def map_qubesd_error(exc: QubesdError) -> GateError:
    message = _STATE_MESSAGES.get(exc.exc_class)
    if message is not None:
        return InvalidStateError(message, reason=f"qubesd {exc.exc_class}")
    return FailedError(reason=f"qubesd {exc.exc_class}")


@dataclass
class Context:
    config: GateConfig
    principal: Principal
    admin: AdminClient
    reader: FleetReader
    verdict: Verdict
    facts: Facts
    #: structural audit details (keys from audit.clean.DETAIL_KEYS only)
    detail: dict[str, object] = field(default_factory=dict)
    #: the gate's id for this request, as journaled in its ``pending`` audit line: a birth marks
    #: the new qube with it so that start-up recovery can find it (create.py), and a command run
    #: in a qube carries it as its run marker, so a restarted gate can find that run's processes
    request_id: str = ""
    #: qubes whose read-as-Running this request has used to skip ``admin.vm.Start`` (once each)
    _start_skipped: set[str] = field(default_factory=set)

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.verdict.args)

    @property
    def target(self) -> str:
        assert self.verdict.target is not None
        return self.verdict.target

    async def qubesd(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        """An Admin API call whose failure becomes a gate refusal."""
        try:
            return await self.admin.call(dest, method, arg, payload)
        except QubesdError as exc:
            self.detail["qubesd_error"] = exc.exc_class
            raise map_qubesd_error(exc) from None

    def running_as_read(self, qube: str) -> bool:
        """Whether this request's fresh facts read ``qube`` as Running, the first time it is
        asked per qube (False after that: a command may have stopped it since).

        The relay then skips ``admin.vm.Start``, which R4.3 turns into a no-op for any qube that
        is not Halted; a qube that halts between the read and the command fails the command,
        exactly as one that halts between a ``Start`` and the command would.
        """
        q = self.facts.get(qube)
        if q is None or q.state != "Running" or qube in self._start_skipped:
            return False
        self._start_skipped.add(qube)
        return True

    async def in_scope(self, name: str) -> bool:
        """Whether ``name`` is enrolled in the principal's scope (read fresh)."""
        return await self.reader.in_scope(name)

    async def enter_scope(self, name: str) -> None:
        """Register a qube the gate just created in the principal's scope: the LAST step of a
        birth, after its tags and network are right (``enrolment.py``). Re-renders the policy;
        raises ``GateError`` (and registers nothing) if that fails, so the birth rolls back."""
        from qubes_mcp.dom0.enrolment import enrol_live

        await enrol_live(
            self.config,
            self.admin,
            self.principal.scope,
            name,
            by=self.principal.scope.born_by(self.principal.qube),
        )

    async def leave_scope(self, name: str) -> list[str]:
        """Unregister a qube the gate removes (or rolls back); re-renders the policy. Returns
        the ids of the lab links that closed with it (a link needs both its qubes)."""
        from qubes_mcp.dom0.enrolment import Registry, commit_change, lost_links

        before: list[Registry] = []

        def change(registry: Registry) -> Registry:
            before.append(registry)
            return registry.unenrolled(self.principal.scope.prefix, name)

        after = await commit_change(self.config, change)
        return [k.id for k in lost_links(before[-1], after)]


Handler = Callable[[Context], Awaitable[dict[str, Any]]]
