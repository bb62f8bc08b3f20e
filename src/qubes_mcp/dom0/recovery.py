"""Start-up recovery: every request the previous gate never finished gets undone and recorded.

When the gate starts, the requests whose last audit line is ``pending`` (dom0/journal.py) are
reconciled, before any new request is served, with the create lock held:

- **a birth** (``qube.create``, ``qube.clone``, ``disposable.create``, ``disposable.run``): the
  qube is identified from the journal and the birth marker, never from anything the agent
  controls. The journal gives the request id, and through it the marker
  ``qubes-mcp-birth-<id>`` (a tag only the gate writes) and, for a disposable, the name
  ``disp-mcp-<id>`` (chosen by the gate before the qube existed). For a create or clone the
  journal also names the qube (its second target), which the gate checked was free, under its
  create lock, before creating it.

  - a disposable (``disp-mcp-<id>``, a DispVM) is removed whatever its state: nothing else
    can have its name, the agent never got it, and a disposable is single-use. (Its tags do
    not tell a finished birth from one cut off before the marker: it inherits its template's.)
  - a create or clone with the marker: the birth never finished (the marker is its last
    step) — the qube is removed, without consent: it never was, or was for a moment, in scope
    with no reply to anyone.
  - without the marker, in the principal's scope: the birth was complete and only the
    outcome line is missing — the qube is kept.
  - without the marker, with no tag of any scope: the gate died between creating it and
    marking it (one qubesd call) — it is removed. An operator who created a qube of exactly
    that name, in the principal's prefix, while the gate was down would lose it; that is the
    only ambiguity, and it needs the operator's own action.

- **a consent never answered** (``consent=asked``): recorded as such; nothing was done.
- **a command in a qube** (``qube.run``, ``file.read``/``write``/``copy``): killing dom0's end
  of the line does not stop it in the qube, so every process carrying the request's run
  marker (relay.py) is killed in each qube the request named; recorded as ``ended its run in
  QUBE`` (or ``nothing to do`` when no qube answered: halted, or gone).
- **any other request**: recorded; what it did is what qubesd now shows.
- **a birth that ended ``failed`` with ``rolled_back: false``** (its rollback could not reach
  qubesd): its qube, identified by the same rules, is removed now, recorded as a
  ``recovery.remove`` line by dom0 (the request already has its one outcome).

Each request gets one outcome line, ``interrupted``, whose ``reason`` says what recovery did
(``removed NAME``, ``kept NAME (birth complete)``, ``nothing to do``, ``could not remove
NAME``, ``consent never answered``). If the audit log cannot take that line, recovery stops
(the pending lines stay open for the next attempt) — it never acts further without recording.
If qubesd cannot be reached, recovery is retried in the background until it succeeds. While
the gate serves, births whose rollback failed are swept every minute (the same rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.record import AuditRecord
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.create import BIRTH_TAG_PREFIX, birth_tag, disposable_name
from qubes_mcp.dom0.enrolment import Registry, registry_path
from qubes_mcp.dom0.errors import GateError
from qubes_mcp.dom0.journal import SWEEP_OP, scan_tail
from qubes_mcp.dom0.reader import property_value
from qubes_mcp.dom0.relay import cancel_in_qube

#: requests that run commands in qubes through relay.py, marked with their request id
RUN_OPS = frozenset({"qube.run", "file.read", "file.write", "file.copy", "template.update"})

log = logging.getLogger("qubes_mcp.gate")

BIRTH_OPS = frozenset({"qube.create", "qube.clone", "disposable.create", "disposable.run"})
#: seconds between attempts while qubesd is unreachable
RETRY_SECONDS = 5.0
#: seconds between sweeps, while the gate serves, for births whose rollback failed
SWEEP_SECONDS = 60.0


@dataclass(frozen=True)
class Reconciled:
    request_id: str
    op: str
    reason: str


def _born_name(record: AuditRecord) -> str | None:
    """The qube this birth request created (or was about to), from the journal only."""
    if not record.request_id.isalnum():  # not an id the gate made: nothing of ours to find
        return None
    if record.op in ("disposable.create", "disposable.run"):
        return disposable_name(record.request_id)
    return record.targets[1] if len(record.targets) > 1 else None


#: how qubesd says "no such qube" (R4.3 answers an invalid name with QubesValueError)
_MISSING = ("QubesVMNotFoundError", "QubesValueError")


class Recovery:
    """One gate's reconciliation of its journal against the fleet (see the module docstring).

    ``admin`` should have a short timeout: recovery holds the create lock while it runs.
    """

    def __init__(self, config: GateConfig, admin: AdminClient, audit: AuditLog) -> None:
        self.config = config
        self.admin = admin
        self.audit = audit
        #: (inode, size) of the log when a sweep last found nothing to do
        self._quiet: tuple[int, int] | None = None

    def _controlled(self, tag: str) -> bool:
        return tag.startswith(BIRTH_TAG_PREFIX) or any(
            p.scope.is_controlled(tag) for p in self.config.principals.values()
        )

    async def _tags(self, name: str) -> set[str] | None:
        try:
            return set(await self.admin.lines(name, "admin.vm.tag.List"))
        except QubesdError as exc:
            if exc.exc_class in _MISSING:
                return None
            raise

    async def _remove(self, name: str) -> str:
        try:
            state = (await self.admin.call(name, "admin.vm.CurrentState")).strip()
            if "power_state=Halted" not in state:
                await self.admin.call(name, "admin.vm.Kill")
        except QubesdError:
            pass  # not running, or gone meanwhile: the removal below says which
        try:
            await self.admin.call(name, "admin.vm.Remove")
        except QubesdError as exc:
            if exc.exc_class in _MISSING:
                return f"nothing to do ({name} is gone)"
            log.error("qubes-mcp recovery: could not remove %s: %s", name, exc.exc_class)
            return f"could not remove {name}"
        return f"removed {name}"

    async def _end_runs(self, record: AuditRecord) -> str:
        """A command the previous gate relayed may still run in its qube (killing dom0's end
        of the line does not stop it there): kill every process marked with the request's id
        (relay.py's run marker) in each qube the request named."""
        ended = [
            qube
            for qube in dict.fromkeys(record.targets)
            if await cancel_in_qube(self.config.paths.qrexec_client, qube, [record.request_id])
        ]
        return f"ended its run in {', '.join(ended)}" if ended else "nothing to do"

    async def _shut_down(self, record: AuditRecord) -> str:
        """A template update leaves its template shut down, interrupted or not
        (handlers_update.py): a template still running is shut down (qubesd refuses a halted
        one, which is as good)."""
        done = []
        for qube in dict.fromkeys(record.targets):
            try:
                await self.admin.call(qube, "admin.vm.Shutdown", "wait")
            except QubesdError:
                continue
            done.append(qube)
        return f"; shut down {', '.join(done)}" if done else ""

    async def _registered(self, scope: str, name: str) -> str | None:
        """The registry's role for ``name`` under its current uuid (decision record 0010): a
        birth is complete only once its name is registered, the last step of ``_enter_scope``."""
        uuid = property_value(await self.admin.call(name, "admin.vm.property.Get", "uuid"))
        return Registry.load(registry_path(self.config.paths.state_dir)).role_of(scope, name, uuid)

    async def _keep(self, record: AuditRecord, name: str, tags: set[str]) -> str | None:
        """Why the qube ``name`` that birth ``record`` names is not to be removed, or None."""
        if record.op in ("disposable.create", "disposable.run"):
            # named for this request: nothing else has this name; a disposable is single-use
            klass = await self.admin.call(name, "admin.vm.property.Get", "klass")
            if property_value(klass) != "DispVM":
                return f"nothing to do ({name} is not this request's disposable)"
            return None
        if birth_tag(record.request_id) in tags:  # the marker: the birth never finished
            return None
        principal = self.config.principals.get(record.principal)
        if principal is not None and principal.scope.is_enrolled(
            tags, await self._registered(principal.scope.prefix, name)
        ):
            return f"kept {name} (birth complete)"  # only the outcome line was missing
        if any(self._controlled(t) for t in tags):
            return f"nothing to do ({name} is not this request's)"
        return None  # created, not yet marked

    async def _birth(self, record: AuditRecord) -> str:
        name = _born_name(record)
        if name is None:
            return "nothing to do"
        tags = await self._tags(name)
        if tags is None:
            return f"nothing to do ({name} was not created)"
        return await self._keep(record, name, tags) or await self._remove(name)

    async def _one(self, record: AuditRecord) -> Reconciled:
        detail: dict[str, object] = {}
        if record.detail.get("consent") == "asked":
            reason = "consent never answered"
            detail["consent"] = "unanswered"
            if "consent_id" in record.detail:
                detail["consent_id"] = record.detail["consent_id"]
        elif record.op in BIRTH_OPS:
            reason = await self._birth(record)
            if reason.startswith("removed "):
                detail["rolled_back"] = True
            elif reason.startswith("could not remove "):
                detail["rolled_back"] = False
        elif record.op in RUN_OPS:
            reason = await self._end_runs(record)
            if record.op == "template.update":
                reason += await self._shut_down(record)
        else:
            reason = "nothing to do"
        detail["reason"] = reason
        await asyncio.to_thread(
            self.audit.append,
            principal=record.principal,
            op=record.op,
            decision="allowed",
            outcome="interrupted",
            targets=list(record.targets),
            request_id=record.request_id,
            detail=detail,
        )
        log.warning(
            "qubes-mcp recovery: %s %s from %s was interrupted: %s",
            record.op,
            record.request_id,
            record.principal,
            reason,
        )
        return Reconciled(record.request_id, record.op, reason)

    async def reconcile(self) -> list[Reconciled]:
        """One pass over the open requests in the journal's tail.

        Raises:
            GateError: qubesd or the audit log is unavailable; what was reconciled so far is
                recorded, the rest stays open for the next pass.
        """
        journal = await asyncio.to_thread(scan_tail, Path(self.audit.path))
        done = [await self._one(record) for record in journal.open()]
        return done + await self.sweep(contextlib.nullcontext())

    async def sweep(self, lock: contextlib.AbstractAsyncContextManager[Any]) -> list[Reconciled]:
        """Only the births whose rollback failed. Safe while the gate serves: those requests
        are closed; the log is read without ``lock`` (the create lock), which is held only to
        act. Skipped while the log has not changed since a sweep that found nothing."""
        path = Path(self.audit.path)
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp == self._quiet:
            return []
        journal = await asyncio.to_thread(scan_tail, path)
        if not journal.unrolled():
            self._quiet = stamp
            return []
        self._quiet = None
        async with lock:
            return [s for r in journal.unrolled() if (s := await self._sweep(r)) is not None]

    async def _sweep(self, record: AuditRecord) -> Reconciled | None:
        """A birth that failed and could not remove its qube (qubesd was down, say): remove it
        now, by the same rules. Recorded once, as a dom0 action carrying the request's id (the
        request already has its one outcome), so that it is never looked at again."""
        name = _born_name(record) if record.op in BIRTH_OPS else None
        if name is None:
            return None
        tags = await self._tags(name)
        if tags is None:
            reason = f"nothing to do ({name} is gone)"
        else:
            reason = await self._keep(record, name, tags) or await self._remove(name)
        await asyncio.to_thread(
            self.audit.append,
            principal="dom0",
            op=SWEEP_OP,
            decision="allowed",
            outcome="failed" if reason.startswith("could not") else "ok",
            targets=[name],
            request_id=record.request_id,
            detail={"reason": f"{reason}, left by {record.op}"},
        )
        log.warning("qubes-mcp recovery: %s (left by request %s)", reason, record.request_id)
        return Reconciled(record.request_id, SWEEP_OP, reason)


async def recover_until_done(
    recovery: Recovery, lock: asyncio.Lock, first_attempt: asyncio.Event
) -> None:
    """Reconcile, holding ``lock`` (the gate's create lock); retry while something is down.
    Then, for as long as the gate serves, sweep births whose rollback failed (qubesd was down
    when they needed it) every :data:`SWEEP_SECONDS`, so a leftover does not hold its name
    until the next restart.

    ``first_attempt`` is set once the first pass has finished or failed, so the daemon can
    report ready with the journal reconciled in the ordinary case.
    """
    reconciled = False
    while True:
        try:
            if reconciled:
                done = await recovery.sweep(lock)
            else:
                async with lock:
                    done = await recovery.reconcile()
            if done:
                log.warning("qubes-mcp recovery: %d request(s) reconciled", len(done))
            reconciled = True
        except (GateError, OSError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.error("qubes-mcp recovery: cannot reconcile yet (%s); retrying", reason)
        except Exception:  # a bug must not keep the gate from serving; say so, retry
            log.exception("qubes-mcp recovery: unexpected failure; retrying")
        first_attempt.set()
        await asyncio.sleep(SWEEP_SECONDS if reconciled else RETRY_SECONDS)
