"""One request through the gate: sanitise, decide, consent, audit, act, redact, answer.

``Gate.handle`` never raises and never allows by default: every failure becomes the refusal
of its ``GateError`` code, and anything unexpected becomes ``failed`` with only its class
name in the audit log. State-changing requests get an audit line before they act
(``outcome=pending``) and one after (``ok``/``failed``/``rolled-back``); one refused before
acting gets a single ``refused``/``not-run`` line. If the audit log cannot be written, the
request is refused and nothing is done.

Two things keep the log truthful under faults and floods. An outcome line that cannot be
written (full disk, I/O error) stops the gate from taking state-changing requests: the
outcome is kept and retried before the next one, and ``status`` says why until it lands.
And every request passes the caller's rate limits (ratelimit.py); repeated refusals are
recorded as the first in full plus one summary line per window (audit/summary.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qubes_mcp.dom0 import (
    create,
    handlers_files,
    handlers_read,
    handlers_update,
    handlers_write,
    links,
)
from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.summary import SUMMARY_ID, RefusalSummary
from qubes_mcp.dom0.config import GateConfig, Principal
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.context import Context, Handler
from qubes_mcp.dom0.decide import Birth, Verdict, decide, names_to_read, needs_sizes
from qubes_mcp.dom0.describe import StepContext, describe, describe_plan
from qubes_mcp.dom0.enrolment import (
    Link,
    Registry,
    RegistryFile,
    commit_change,
    lost_links,
    reconcile,
    registry_path,
)
from qubes_mcp.dom0.errors import (
    FailedError,
    GateError,
    NotFoundError,
    UnavailableError,
    WithdrawnError,
)
from qubes_mcp.dom0.facts import Facts, Prop, QubeFacts
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.operations import (
    OPERATIONS_BY_NAME,
    OPERATIONS_BY_SERVICE,
    Operation,
    Target,
)
from qubes_mcp.dom0.plans import PLAN_TTL, Plan, PlanBook, PlanStep
from qubes_mcp.dom0.ratelimit import RateLimiter
from qubes_mcp.dom0.reader import FleetReader
from qubes_mcp.dom0.schema import check_payload
from qubes_mcp.dom0.tiers import MEMBER, Tier, effective_tier

log = logging.getLogger("qubes_mcp.gate")
T = TypeVar("T")


def _forget(name: str, scopes: list[str]) -> Callable[[Registry], Registry]:
    """A registry change: ``name`` unregistered from every scope in ``scopes``."""

    def change(registry: Registry) -> Registry:
        for scope in scopes:
            registry = registry.unenrolled(scope, name)
        return registry

    return change


#: every operation but the two plan operations, which the pipeline itself runs (Gate._propose,
#: Gate._apply); tests/unit/test_gate_wiring.py keeps this and the table in step
HANDLERS: dict[str, Handler] = {
    "qube.list": handlers_read.qube_list,
    "qube.info": handlers_read.qube_info,
    "firewall.get": handlers_read.firewall_get,
    "devices.list": handlers_read.devices_list,
    "events.watch": handlers_read.events_watch,
    "budget.get": handlers_read.budget_get,
    "qube.start": handlers_write.qube_start,
    "qube.shutdown": handlers_write.qube_shutdown,
    "qube.pause": handlers_write.qube_pause,
    "qube.unpause": handlers_write.qube_unpause,
    "qube.kill": handlers_write.qube_kill,
    "qube.run": handlers_write.qube_run,
    "file.read": handlers_files.file_read,
    "file.write": handlers_files.file_write,
    "file.copy": handlers_write.file_copy,
    "firewall.set": handlers_write.firewall_set,
    "link.open": links.link_open,
    "link.list": links.link_list,
    "link.close": links.link_close,
    "qube.create": create.qube_create,
    "disposable.create": create.disposable_create,
    "disposable.run": create.disposable_run,
    "qube.clone": create.qube_clone,
    "property.set": handlers_write.property_set,
    "feature.set": handlers_write.feature_set,
    "device.attach": handlers_write.device_attach,
    "device.detach": handlers_write.device_detach,
    "qube.remove": handlers_write.qube_remove,
    # research loop
    "qube.log": handlers_read.qube_log,
    "qube.revert": handlers_write.qube_revert,
    "template.update": handlers_update.template_update,
}


@dataclass(frozen=True)
class Request:
    """What qrexec hands the gate. ``source`` and ``target`` come from the qrexec daemon (the
    policy decided on them); only the payload is the agent's."""

    service: str
    source: str
    target: str | None  # None when addressed to @adminvm / dom0
    untrusted_payload: bytes
    #: set by the daemon when the caller hangs up (its qrexec connection closed): the request
    #: is withdrawn wherever it still waits, and never starts to act
    hangup: asyncio.Event | None = field(default=None, compare=False)


def _withdrawn(request: Request) -> bool:
    return request.hangup is not None and request.hangup.is_set()


async def unless_withdrawn(
    request: Request, waiting: Awaitable[T], *, undo: Callable[[T], object] | None = None
) -> T:
    """Wait for ``waiting`` (the operator, a lock, a slot) unless the caller hangs up first:
    then the wait is cancelled and the request refused as withdrawn. ``undo`` gives back what
    ``waiting`` obtained when it is not going to be used (a lock acquired just as the caller
    hung up, or as this task was cancelled)."""
    if request.hangup is None:
        return await waiting
    work = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(request.hangup.wait())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _abandon(work, undo)
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        _abandon(work, undo)  # it may have finished before the cancellation reached it
        raise WithdrawnError(reason="the caller hung up while the request waited")
    return work.result()


def _abandon(work: asyncio.Future[T], undo: Callable[[T], object] | None) -> None:
    if not work.done():
        work.cancel()
    elif undo is not None and not work.cancelled() and work.exception() is None:
        undo(work.result())


@dataclass
class _Call:
    """The state of one request as it moves through the pipeline."""

    request: Request
    op: Operation | None
    principal: Principal | None
    #: the configuration the request started under: it is decided, asked and acted under it
    #: even if the operator reloads meanwhile (daemon.py, ``GateDaemon.use``)
    config: GateConfig
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))
    detail: dict[str, object] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    #: set once the handler may have changed something (an audit "pending" line exists)
    acting: bool = False
    #: a step of a plan the operator approved as a whole: no second question
    preapproved: bool = False
    started: float = field(default_factory=time.monotonic)


class Gate:
    """The decision pipeline, shared by every connection of one daemon."""

    def __init__(
        self,
        config: GateConfig,
        audit: AuditLog,
        consent: ConsentBroker,
        admin: AdminClient | None = None,
    ) -> None:
        self.config = config
        self.audit = audit
        self.consent = consent
        self.admin = admin or AdminClient(config.paths.qubesd_socket)
        #: the pool-cap check and the create must not interleave between requests
        self.create_lock = asyncio.Lock()
        self.plans = PlanBook()
        #: who is in which scope (decision record 0010); re-read whenever the file is replaced
        self.registry = RegistryFile(registry_path(config.paths.state_dir))
        self._reconciled = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.limiter = RateLimiter(config.limits)
        self.refusals = RefusalSummary()
        #: why the gate takes no state-changing request (an outcome it could not record)
        self.halted: str | None = None
        #: outcome lines that could not be written yet: (call, outcome, code)
        self._unrecorded: list[tuple[_Call, str, str]] = []
        #: the last audit failure, for ``status`` (cleared by the next successful append)
        self.audit_problem: str | None = None
        self._flushers: set[asyncio.Task[None]] = set()
        self._resume_lock = asyncio.Lock()

    async def ensure_reconciled(self) -> None:
        """Once per process, before the first decision: drop registrations of qubes that are
        gone or were re-created (new uuid), then keep doing so on qubesd's domain-delete."""
        async with self._reconciled:
            if self._watcher is not None:
                return
            before = self.registry.current()
            await reconcile(self.config, self.admin)
            await self._links_closed(lost_links(before, self.registry.current()))
            await self.revalidate_links("tier below net")
            self._watcher = asyncio.create_task(self._watch_deletes())

    async def revalidate_links(self, reason: str) -> None:
        """Close every lab link an end of which is no longer at net or above for the principal
        that opened it, under the running configuration (decision record 0018): a tier tag
        removed by hand, a ceiling or ``default_tier`` lowered by a reload, a principal gone.
        The one check for every path; called at start, after a reload and on tag events of a
        linked qube. Reads only the linked qubes (in scope when opened). Never raises."""
        try:
            registry = self.registry.current()
            tiers: dict[tuple[str, str], Tier | None] = {}  # each qube read once per principal
            doomed: list[str] = []
            for link in registry.links():
                principal = self.config.principals.get(link.by.removeprefix("gate:"))
                if principal is None or principal.scope.prefix != link.scope:
                    doomed.append(link.id)
                    continue
                for name in (link.client, link.server):
                    if (principal.qube, name) not in tiers:
                        tiers[principal.qube, name] = await self._tier_of(principal, name)
                if any(
                    (t := tiers[principal.qube, name]) is None or t < Tier.NET
                    for name in (link.client, link.server)
                ):
                    doomed.append(link.id)
            if not doomed:
                return

            def close(r: Registry) -> Registry:
                for link_id in doomed:
                    r = r.unlinked(link_id)
                return r

            after = await commit_change(self.config, close)
            await self._links_closed(lost_links(registry, after), reason=reason)
        except (GateError, OSError) as exc:  # unreadable now: kept, checked again next time
            log.warning("qubes-mcp gate: links not revalidated: %s", type(exc).__name__)

    async def _tier_of(self, principal: Principal, name: str) -> Tier | None:
        """``name``'s tier for ``principal`` now (None: not in its scope), read fresh."""
        q = await FleetReader(self.admin, principal.scope, self.registry).qube(name, sizes=False)
        if q is None:
            return None
        return effective_tier(
            principal.scope, q.tags, q.registered, self.config.default_tier, principal.ceiling
        )

    async def _links_closed(self, links: list[Link], *, reason: str = "qube removed") -> None:
        """One audit line per lab link a registry change closed (its policy line went in the
        same commit; decision record 0018). Never raises: the links are closed whether or not
        the line is written, and the gate's journal says so."""
        for link in links:
            log.info("qubes-mcp gate: link %s closed: %s", link.id, reason)
            try:
                await self._append(
                    principal=link.by.removeprefix("gate:"),
                    op="link.close",
                    decision="allowed",
                    outcome="ok",
                    targets=[link.client, link.server],
                    request_id=secrets.token_hex(8),
                    detail={"link_id": link.id, "port": link.port, "reason": reason},
                )
            except GateError as exc:
                log.warning("qubes-mcp gate: link close not recorded: %s", exc.reason or exc)

    async def _watch_deletes(self) -> None:
        """Reconcile after every ``domain-delete`` of a registered name (as dom0, through
        ``admin.Events``), so a name the operator removes and re-creates never carries the old
        enrolment in the policy. Reconnects after a lost stream; a failure is logged."""
        while True:
            try:
                async for ev in self.admin.events("dom0"):
                    about = ev.subject or ev.kwargs.get("vm", "")
                    registry = self.registry.current()
                    scopes = [s for s in registry.scopes() if registry.entry(s, about)]
                    if ev.name == "domain-delete" and scopes:
                        # the event names the qube that is gone: forget it, without asking
                        # qubesd anything more (a re-created name gets a new uuid anyway)
                        after = await commit_change(self.config, _forget(about, scopes))
                        await self._links_closed(lost_links(registry, after))
                    elif ev.name.startswith(("domain-tag-add:", "domain-tag-delete:")) and any(
                        about in (k.client, k.server) for k in registry.links()
                    ):  # a tier tag of a linked qube changed by hand (qvm-tags)
                        await self.revalidate_links("tier below net")
            except asyncio.CancelledError:
                raise
            except (GateError, OSError, asyncio.IncompleteReadError) as exc:
                # keep watching; every read still checks uuids itself
                log.warning("qubes-mcp gate: reconcile watcher: %s", type(exc).__name__)
            await asyncio.sleep(1)

    async def _append(self, **fields: Any) -> None:
        # append fsyncs: keep it off the event loop so other requests are not stalled
        try:
            await asyncio.to_thread(self.audit.append, **fields)
        except GateError as exc:
            self.audit_problem = exc.reason or exc.message
            raise
        self.audit_problem = None

    async def _audit(self, call: _Call, *, decision: str, outcome: str, code: str = "") -> None:
        await self._flush_refusals()
        await self._append(
            principal=call.request.source,
            op=call.op.name if call.op else call.request.service,
            decision=decision,
            outcome=outcome,
            targets=call.targets,
            code=code,
            request_id=call.request_id,
            detail=call.detail,
        )

    async def _flush_refusals(self, *, everything: bool = False) -> None:
        """Write one summary line per ended window of repeated refusals (audit/summary.py)."""
        due = self.refusals.due(everything=everything)
        for index, item in enumerate(due):
            principal, op, code = item.key
            try:
                await self._append(
                    principal=principal,
                    op=op,
                    decision="refused",
                    outcome="not-run",
                    code=code,
                    request_id=SUMMARY_ID,
                    detail={
                        "summary": "refusals",
                        "count": item.count,
                        "window_s": self.refusals.window,
                    },
                )
            except GateError:
                self.refusals.restore(due[index:])  # counted again into the next line
                return

    def _flush_later(self) -> None:
        """Make sure a window's summary is written when it ends, even if nothing follows."""

        def spawn() -> None:
            task = asyncio.ensure_future(self._flush_refusals())
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)

        asyncio.get_running_loop().call_later(self.refusals.window + 0.05, spawn)

    async def flush(self) -> None:
        """Write every counted refusal now (the daemon calls this when it stops)."""
        await self._flush_refusals(everything=True)

    async def _record_outcome(
        self, call: _Call, *, decision: str, outcome: str, code: str = ""
    ) -> None:
        """The outcome line of a request that acted; if it cannot be written, stop."""
        try:
            await self._audit(call, decision=decision, outcome=outcome, code=code)
        except GateError as exc:
            self._unrecorded.append((call, outcome, code))
            self.halted = (
                f"the outcome of {call.op.name if call.op else call.request.service} "
                f"(request {call.request_id}) could not be recorded: {exc.reason or exc}"
            )
            log.error("qubes-mcp gate: refusing state-changing requests: %s", self.halted)

    async def _resume(self) -> None:
        """Retry the outcome lines the gate owes; once all are written, take requests again."""
        async with self._resume_lock:
            while self._unrecorded:
                call, outcome, code = self._unrecorded[0]
                call.detail["recorded_late"] = True
                try:
                    await self._audit(call, decision="allowed", outcome=outcome, code=code)
                except GateError:
                    return
                self._unrecorded.pop(0)
            if self.halted is not None:
                log.warning("qubes-mcp gate: owed outcomes recorded; taking requests again")
            self.halted = None

    def status(self) -> dict[str, Any]:
        """What the operator's ``status`` shows about the request path and its log."""
        return {
            "serving": "reads only" if self.halted else "all requests",
            "halted": self.halted,
            "unrecorded_outcomes": len(self._unrecorded),
            "audit_problem": self.audit_problem,
            "refusals_counted": self.refusals.pending,
        }

    async def handle(self, request: Request, config: GateConfig | None = None) -> dict[str, Any]:
        """Answer one request with one JSON object, under ``config`` (the one in place when the
        request arrived; the gate's current one by default). Never raises."""
        return await self._handle(request, admit=True, config=config)

    async def refuse_unread(
        self,
        service: str,
        source: str,
        target: str | None,
        exc: GateError,
        config: GateConfig | None = None,
    ) -> dict[str, Any]:
        """Refuse a request the daemon could not hand over whole (too large, never completed,
        over its qube's share, withdrawn while queued): audited like any refusal, with the
        operation its service names, so every request that reached the gate leaves a line."""
        call = _Call(
            Request(service, source, target, b""),
            OPERATIONS_BY_SERVICE.get(service),
            (config or self.config).principals.get(source),
            config or self.config,
        )
        call.targets = [target] if target else []
        return await self._refuse(call, exc)

    async def _handle(
        self,
        request: Request,
        *,
        admit: bool = False,
        preapproved: bool = False,
        detail: dict[str, object] | None = None,
        config: GateConfig | None = None,
    ) -> dict[str, Any]:
        config = config or self.config  # captured once: a reload does not change it midway
        call = _Call(
            request,
            OPERATIONS_BY_SERVICE.get(request.service),
            config.principals.get(request.source),
            config,
            preapproved=preapproved,
        )
        call.detail.update(detail or {})
        call.targets = [request.target] if request.target else []
        try:
            if admit:  # a plan's steps were admitted with the plan
                self.limiter.admit(request.source)
            result = await self._run(call)
        except GateError as exc:
            return await self._refuse(call, exc)
        except asyncio.CancelledError:
            # the daemon is stopping: a request that has not acted is refused and recorded
            # (one that has is left to start-up recovery, with its "pending" line)
            if not call.acting:
                await asyncio.shield(
                    self._refuse(call, UnavailableError(reason="the gate stopped"))
                )
            raise
        except Exception as exc:  # fail closed on anything unexpected; keep only the class
            log.exception("qubes-mcp gate: unexpected %s", type(exc).__name__)
            call.detail["error_class"] = type(exc).__name__
            return await self._refuse(call, FailedError(reason=f"unexpected {type(exc).__name__}"))
        if call.op is not None and call.op.state_changing:
            call.detail["duration_ms"] = round((time.monotonic() - call.started) * 1000)
            # it was done: the agent learns so even if the line cannot be written (then the
            # gate stops taking state-changing requests until it is)
            await self._record_outcome(call, decision="allowed", outcome="ok")
        return {"ok": True, "result": result}

    async def _refuse(self, call: _Call, exc: GateError) -> dict[str, Any]:
        if exc.reason:
            call.detail.setdefault("reason", exc.reason)
        self.limiter.refused(call.request.source)
        if call.op is not None and not call.op.state_changing:
            if exc.code != "rate-limited":  # a flood must not flood the journal either
                self._journal(call, exc)
            return exc.to_reply()
        if call.acting:
            outcome = "rolled-back" if call.detail.get("rolled_back") else "failed"
            self._journal(call, exc)
            await self._record_outcome(call, decision="allowed", outcome=outcome, code=exc.code)
            return exc.to_reply()
        await self._flush_refusals()
        key = (call.request.source, call.op.name if call.op else call.request.service, exc.code)
        if not self.refusals.first(key):
            return exc.to_reply()  # counted: the window's summary line records it
        self._journal(call, exc)
        self._flush_later()
        try:
            await self._audit(call, decision="refused", outcome="not-run", code=exc.code)
        except GateError as err:
            log.warning("qubes-mcp gate: refusal not recorded: %s", err.reason or err)
        return exc.to_reply()

    @staticmethod
    def _journal(call: _Call, exc: GateError) -> None:
        log.info(
            "qubes-mcp gate: %s %s from %s refused: %s (%s)",
            call.request.service,
            call.request.target,
            call.request.source,
            exc.code,
            exc.reason,
        )

    async def _run(self, call: _Call) -> dict[str, Any]:
        op, principal, target = call.op, call.principal, call.request.target
        if op is None or principal is None:
            raise NotFoundError(reason="unknown service or caller")
        if op.state_changing and self.halted is not None:
            await self._resume()
            if self.halted is not None:
                raise UnavailableError(reason=f"gate stopped: {self.halted}")
        if op.target is Target.GLOBAL:
            if target is not None:
                raise NotFoundError(reason="global operation addressed to a qube")
        elif target is None or target == "dom0" or not is_valid_qube_name(target):
            raise NotFoundError(reason="operation needs a target qube")
        args = check_payload(op, call.request.untrusted_payload, name_prefix=principal.name_prefix)
        await self.ensure_reconciled()
        if op.name == "plan.propose":
            return await self._propose(call.config, principal, args)
        if op.name == "plan.apply":
            return await self._apply(call, principal, args)
        if op.creates:
            await unless_withdrawn(
                call.request, self.create_lock.acquire(), undo=lambda _: self.create_lock.release()
            )
            try:
                return await self._decide_and_act(call, op, principal, args)
            finally:
                self.create_lock.release()
        return await self._decide_and_act(call, op, principal, args)

    @staticmethod
    def _names(
        op: Operation, principal: Principal, target: str | None, args: dict[str, Any]
    ) -> list[str]:
        """Every qube the decision reads: what the request names, and the principal's egress
        for creates."""
        names = names_to_read(op, target, args)
        if op.creates and principal.egress_qube:
            names.append(principal.egress_qube)
        return names

    async def _read_and_decide(
        self,
        reader: FleetReader,
        principal: Principal,
        op: Operation,
        target: str | None,
        args: dict[str, Any],
        *,
        config: GateConfig,
    ) -> tuple[Verdict, Facts]:
        """Fresh facts, then the pure decision (the same for a request and a plan's step)."""
        facts = await reader.facts(
            self._names(op, principal, target, args),
            with_scope=op.creates,
            sizes=needs_sizes(op),
        )
        facts = facts.with_registrars(self._registrar(reader, principal))
        verdict = decide(
            principal=principal, op=op, target=target, args=args, facts=facts, config=config
        )
        return verdict, facts

    @staticmethod
    def _registrar(reader: FleetReader, principal: Principal) -> Callable[[str, str], str | None]:
        """Who registered a name under a uuid, in the snapshot the reader decided membership
        with (``created_by`` needs it; the reader fills only the role)."""
        registry, scope = reader.registry, principal.scope.prefix
        return lambda name, uuid: registry.registrar(scope, name, uuid)

    async def _decide_and_act(
        self, call: _Call, op: Operation, principal: Principal, args: dict[str, Any]
    ) -> dict[str, Any]:
        target = call.request.target
        reader = FleetReader(self.admin, principal.scope, self.registry)
        call.targets = list(dict.fromkeys(names_to_read(op, target, args)))
        verdict, facts = await self._read_and_decide(
            reader, principal, op, target, args, config=call.config
        )
        if target is not None:
            call.detail["tier"] = verdict.tiers[target].word
        if op.name == "link.open" and target is not None:
            # refused now rather than after the operator approved it (checked again on commit)
            links.check_open(reader.registry, principal, target, args["server"], args["port"])
        if verdict.consent and call.preapproved:
            call.detail["consent"] = "plan"
        elif verdict.consent:
            call.detail["consent"] = "asked"
            if op.state_changing:  # journal the wait: recovery records a question never answered
                await self._audit(call, decision="allowed", outcome="pending")
            call.detail["consent_id"] = await self.consent.ask(
                principal=principal.qube,
                op=op.name,
                target=target or "dom0",
                args=verdict.args,
                description=describe(
                    op,
                    target,
                    verdict.args,
                    facts=facts,
                    birth=verdict.birth,
                    current_rules=await self._current_rules(op, target),
                ),
                reasons=verdict.consent_reasons,
                withdrawn=call.request.hangup,
                timeout=self._consent_timeout(call),
            )
            call.detail["consent"] = "approved"
        if _withdrawn(call.request):  # the last moment before acting
            raise WithdrawnError(reason="the caller hung up before the request acted")
        if op.state_changing:
            await self._audit(call, decision="allowed", outcome="pending")
        call.acting = True
        ctx = Context(
            call.config, principal, self.admin, reader, verdict, facts, call.detail, call.request_id
        )
        return await HANDLERS[op.name](ctx)

    def _consent_timeout(self, call: _Call) -> float | None:
        """The broker's timeout is the current configuration's (the daemon keeps it so); a
        request that started under an earlier configuration keeps that one's."""
        return None if call.config is self.config else call.config.consent.timeout

    async def _current_rules(self, op: Operation, target: str | None) -> list[str] | None:
        """A firewall request shows the rules it replaces: read them (None if unreadable)."""
        if op.name != "firewall.set" or target is None:
            return None
        try:
            text = await self.admin.call(target, "admin.vm.firewall.Get")
        except QubesdError:
            return None
        return [line for line in text.split("\n") if line]

    async def _plan_context(self, principal: Principal, plan: Plan) -> dict[int, StepContext]:
        """Fresh facts for describing each step that is not deferred (what a removal loses,
        the rules a firewall step replaces); deferred steps are described from their args."""
        reader = FleetReader(self.admin, principal.scope, self.registry)
        context = {}
        for step in plan.steps:
            if not step.deferred:
                names = names_to_read(step.op, step.target, step.args)
                context[step.index] = StepContext(
                    await reader.facts(names), await self._current_rules(step.op, step.target)
                )
        return context

    # --- plans ------------------------------------------------------------------------------

    async def _propose(
        self, config: GateConfig, principal: Principal, args: dict[str, Any]
    ) -> dict[str, Any]:
        """Decide every step without acting (plans.py); keep the plan if none is refused.

        A step about a qube an earlier step creates is *deferred*: decided now as it will meet
        that qube -- at the tier, with the tags and the registration the creating step's
        ``Birth`` gives it (``_unborn``) -- and decided again, with fresh facts, when it runs.
        Power states are not checked ahead (``now=False``): earlier steps change them.
        Every step's ``verdict`` has one shape: ``{decision, consent, error}``.
        """
        reader = FleetReader(self.admin, principal.scope, self.registry)
        registrar = self._registrar(reader, principal)
        steps: list[PlanStep] = []
        report: list[dict[str, Any]] = []
        born: dict[str, QubeFacts] = {}
        for index, raw in enumerate(args["steps"]):
            op = OPERATIONS_BY_NAME[raw["op"]]
            target = raw["target"]
            entry: dict[str, Any] = {"index": index, "op": op.name, "target": target}
            try:
                step_args = check_payload(
                    op, json.dumps(raw["args"]).encode(), name_prefix=principal.name_prefix
                )
                names = self._names(op, principal, target, step_args)
                deferred = bool(born.keys() & set(names))
                read = await reader.facts(
                    [n for n in names if n not in born], with_scope=op.creates
                )
                read = read.with_registrars(registrar)
                facts = Facts(
                    qubes={**read.qubes, **{n: born[n] for n in names if n in born}},
                    scope_qubes=read.scope_qubes,
                )
                verdict = decide(
                    principal=principal,
                    op=op,
                    target=target,
                    args=step_args,
                    facts=facts,
                    config=config,
                    now=False,
                )
            except GateError as exc:
                entry["verdict"] = {
                    "decision": "refused",
                    "consent": False,
                    "error": exc.to_reply()["error"],
                }
                report.append(entry)
                continue
            if verdict.birth is not None and verdict.birth.name:
                born[verdict.birth.name] = _unborn(verdict.birth, principal, facts)
            steps.append(PlanStep(index, op, target, dict(verdict.args), deferred, verdict.consent))
            entry["verdict"] = {
                "decision": "deferred" if deferred else "allowed",
                "consent": verdict.consent,
                "error": None,
            }
            report.append(entry)
        if len(steps) != len(report):
            return {"plan_id": None, "digest": None, "steps": report, "needs_consent": False}
        plan = self.plans.keep(principal.qube, args["title"], steps)
        return {
            "plan_id": plan.id,
            "digest": plan.digest,
            "steps": report,
            "needs_consent": plan.needs_consent,
            "expires_in": int(PLAN_TTL),
        }

    async def _apply(
        self, call: _Call, principal: Principal, args: dict[str, Any]
    ) -> dict[str, Any]:
        plan = self.plans.take(principal.qube, args["plan_id"], args["digest"])
        call.detail["plan_id"] = plan.id
        if plan.needs_consent:
            call.detail["consent"] = "asked"
            await self._audit(call, decision="allowed", outcome="pending")
            call.detail["consent_id"] = await self.consent.ask(
                principal=principal.qube,
                op="plan.apply",
                target="dom0",
                args={"plan": plan.id, "digest": plan.digest},
                description=describe_plan(plan, await self._plan_context(principal, plan)),
                reasons=tuple(
                    f"step {s.index + 1}: {s.op.name} needs consent"
                    for s in plan.steps
                    if s.consent
                ),
                withdrawn=call.request.hangup,
                timeout=self._consent_timeout(call),
            )
            call.detail["consent"] = "approved"
        if _withdrawn(call.request):
            raise WithdrawnError(reason="the caller hung up before the plan started")
        await self._audit(call, decision="allowed", outcome="pending")
        call.acting = True
        done: list[dict[str, Any]] = []
        for step in plan.steps:
            reply = await self._handle(
                Request(
                    step.op.service,
                    principal.qube,
                    step.target,
                    json.dumps(step.args).encode(),
                    call.request.hangup,  # a step not yet started is withdrawn with its plan
                ),
                preapproved=plan.needs_consent,
                detail={"plan_id": plan.id, "step": step.index},
                config=call.config,  # every step under the configuration the plan started with
            )
            done.append(
                {
                    "index": step.index,
                    "op": step.op.name,
                    "target": step.target,
                    **({"result": reply["result"]} if reply["ok"] else {"error": reply["error"]}),
                }
            )
            if not reply["ok"]:
                break
        stopped = None if all("result" in d for d in done) else done[-1]["index"]
        return {
            "plan_id": plan.id,
            "steps": done,
            "completed": len(done) - (stopped is not None),
            "stopped_at": stopped,
        }


def _unborn(birth: Birth, principal: Principal, facts: Facts) -> QubeFacts:
    """The facts a qube will have right after ``birth`` (for deciding a plan's later steps
    ahead): the tags the gate stamps, the gate's registration for ``principal``, the class,
    label, network and template it is created with, and no state yet (Halted)."""
    source = facts.get(birth.source)
    if birth.klass == "DispVM" or (source is not None and source.klass == "TemplateVM"):
        template = birth.source  # a disposable's and a new app qube's template is its source
    else:
        template = source.prop("template") if source is not None else ""  # a clone's
    props = {
        "label": birth.label,
        "netvm": birth.netvm or "",
        "template": template,
        "template_for_dispvms": str(birth.template_for_dispvms),
    }
    return QubeFacts(
        name=birth.name,
        klass=birth.klass,
        state="Halted",
        tags=birth.stamp,
        props={k: Prop(False, "str", v) for k, v in props.items()},
        footprint=birth.estimate,
        private_size=birth.private_size or birth.estimate,
        registered=MEMBER,
        by=principal.scope.born_by(principal.qube),
    )
