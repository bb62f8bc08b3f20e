"""One request through the gate: sanitise, decide, consent, audit, act, redact, answer.

``Gate.handle`` never raises and never allows by default: every failure becomes the refusal
of its ``GateError`` code, and anything unexpected becomes ``failed`` with only its class
name in the audit log. State-changing requests get an audit line before they act
(``outcome=pending``) and one after (``ok``/``failed``/``rolled-back``); one refused before
acting gets a single ``refused``/``not-run`` line. If the audit log cannot be written, the
request is refused and nothing is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.dom0 import create, handlers_read, handlers_write
from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit import AuditLog
from qubes_mcp.dom0.config import GateConfig, Principal
from qubes_mcp.dom0.consent import ConsentBroker
from qubes_mcp.dom0.context import Context, Handler
from qubes_mcp.dom0.decide import Verdict, decide, names_to_read
from qubes_mcp.dom0.errors import FailedError, GateError, NotFoundError
from qubes_mcp.dom0.facts import Facts
from qubes_mcp.dom0.firewall import render_rule
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.operations import (
    OPERATIONS_BY_NAME,
    OPERATIONS_BY_SERVICE,
    Operation,
    Target,
)
from qubes_mcp.dom0.plans import PLAN_TTL, PlanBook, PlanStep
from qubes_mcp.dom0.reader import FleetReader
from qubes_mcp.dom0.schema import check_payload

log = logging.getLogger("qubes_mcp.gate")

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
    "file.copy": handlers_write.file_copy,
    "firewall.set": handlers_write.firewall_set,
    "qube.create": create.qube_create,
    "disposable.create": create.disposable_create,
    "disposable.run": create.disposable_run,
    "qube.clone": create.qube_clone,
    "property.set": handlers_write.property_set,
    "feature.set": handlers_write.feature_set,
    "device.attach": handlers_write.device_attach,
    "device.detach": handlers_write.device_detach,
    "qube.remove": handlers_write.qube_remove,
}


@dataclass(frozen=True)
class Request:
    """What qrexec hands the gate. ``source`` and ``target`` come from the qrexec daemon (the
    policy decided on them); only the payload is the agent's."""

    service: str
    source: str
    target: str | None  # None when addressed to @adminvm / dom0
    untrusted_payload: bytes


def describe(op: Operation, verdict: Verdict, facts: Facts) -> str:
    """What the operator is asked to approve, in words: qube, class, size, what is lost."""
    a = verdict.args
    target = verdict.target or "dom0"
    q = facts.get(verdict.target)
    if op.name == "qube.remove" and q is not None:
        size = q.private_size / (1 << 30)
        return (
            f"REMOVE qube {target} ({q.klass}, private volume {size:.1f} GiB): "
            "the qube and all data in it will be lost"
        )
    if op.name == "firewall.set":
        rules = "\n".join(f"  {render_rule(r)}" for r in a["rules"]) or "  (none: drop all)"
        return f"REPLACE the firewall of {target} with {len(a['rules'])} rule(s):\n{rules}"
    if op.name in ("device.attach", "device.detach"):
        mode = " read-only" if a.get("read_only") else ""
        verb = "ATTACH" if op.name == "device.attach" else "DETACH"
        where = "to" if verb == "ATTACH" else "from"
        return f"{verb} block device {a['backend']}:{a['device']} {where} {target}{mode}"
    detail = ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("stdin",) and v is not None)
    return f"{op.name} on {target}" + (f" ({detail})" if detail else "")


@dataclass
class _Call:
    """The state of one request as it moves through the pipeline."""

    request: Request
    op: Operation | None
    principal: Principal | None
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

    async def _audit(self, call: _Call, *, decision: str, outcome: str, code: str = "") -> None:
        # append fsyncs: keep it off the event loop so other requests are not stalled
        await asyncio.to_thread(
            self.audit.append,
            principal=call.request.source,
            op=call.op.name if call.op else call.request.service,
            decision=decision,
            outcome=outcome,
            targets=call.targets,
            code=code,
            request_id=call.request_id,
            detail=call.detail,
        )

    async def handle(self, request: Request) -> dict[str, Any]:
        """Answer one request with one JSON object. Never raises."""
        return await self._handle(request)

    async def _handle(
        self,
        request: Request,
        *,
        preapproved: bool = False,
        detail: dict[str, object] | None = None,
    ) -> dict[str, Any]:
        call = _Call(
            request,
            OPERATIONS_BY_SERVICE.get(request.service),
            self.config.principals.get(request.source),
            preapproved=preapproved,
        )
        call.detail.update(detail or {})
        call.targets = [request.target] if request.target else []
        try:
            result = await self._run(call)
        except GateError as exc:
            return await self._refuse(call, exc)
        except Exception as exc:  # fail closed on anything unexpected; keep only the class
            log.exception("qubes-mcp gate: unexpected %s", type(exc).__name__)
            call.detail["error_class"] = type(exc).__name__
            return await self._refuse(call, FailedError(reason=f"unexpected {type(exc).__name__}"))
        if call.op is not None and call.op.state_changing:
            call.detail["duration_ms"] = round((time.monotonic() - call.started) * 1000)
            await self._audit(call, decision="allowed", outcome="ok")
        return {"ok": True, "result": result}

    async def _refuse(self, call: _Call, exc: GateError) -> dict[str, Any]:
        if exc.reason:
            call.detail.setdefault("reason", exc.reason)
        log.info(
            "qubes-mcp gate: %s %s from %s refused: %s (%s)",
            call.request.service,
            call.request.target,
            call.request.source,
            exc.code,
            exc.reason,
        )
        if call.op is None or call.op.state_changing:
            outcome = "not-run"
            if call.acting:
                outcome = "rolled-back" if call.detail.get("rolled_back") else "failed"
            try:
                await self._audit(
                    call,
                    decision="allowed" if call.acting else "refused",
                    outcome=outcome,
                    code=exc.code,
                )
            except GateError:
                log.exception("qubes-mcp gate: audit log unavailable")
        return exc.to_reply()

    async def _run(self, call: _Call) -> dict[str, Any]:
        op, principal, target = call.op, call.principal, call.request.target
        if op is None or principal is None:
            raise NotFoundError(reason="unknown service or caller")
        if op.target is Target.GLOBAL:
            if target is not None:
                raise NotFoundError(reason="global operation addressed to a qube")
        elif target is None or target == "dom0" or not is_valid_qube_name(target):
            raise NotFoundError(reason="operation needs a target qube")
        args = check_payload(op, call.request.untrusted_payload, name_prefix=principal.name_prefix)
        if op.name == "plan.propose":
            return await self._propose(principal, args)
        if op.name == "plan.apply":
            return await self._apply(call, principal, args)
        if op.creates:
            async with self.create_lock:
                return await self._decide_and_act(call, op, principal, args)
        return await self._decide_and_act(call, op, principal, args)

    def _names(self, op: Operation, target: str | None, args: dict[str, Any]) -> list[str]:
        """Every qube the decision reads: what the request names, and the egress for creates."""
        names = names_to_read(op, target, args)
        if op.creates and self.config.egress_qube:
            names.append(self.config.egress_qube)
        return names

    async def _read_and_decide(
        self,
        reader: FleetReader,
        principal: Principal,
        op: Operation,
        target: str | None,
        args: dict[str, Any],
    ) -> tuple[Verdict, Facts]:
        """Fresh facts, then the pure decision (the same for a request and a plan's step)."""
        facts = await reader.facts(self._names(op, target, args), with_scope=op.creates)
        verdict = decide(
            principal=principal, op=op, target=target, args=args, facts=facts, config=self.config
        )
        return verdict, facts

    async def _decide_and_act(
        self, call: _Call, op: Operation, principal: Principal, args: dict[str, Any]
    ) -> dict[str, Any]:
        target = call.request.target
        reader = FleetReader(self.admin, principal.scope)
        call.targets = list(dict.fromkeys(names_to_read(op, target, args)))
        verdict, facts = await self._read_and_decide(reader, principal, op, target, args)
        if target is not None:
            call.detail["tier"] = verdict.tiers[target].word
        if verdict.consent and call.preapproved:
            call.detail["consent"] = "plan"
        elif verdict.consent:
            call.detail["consent"] = "asked"
            call.detail["consent_id"] = await self.consent.ask(
                principal=principal.qube,
                op=op.name,
                target=target or "dom0",
                args=verdict.args,
                description=describe(op, verdict, facts),
                reasons=verdict.consent_reasons,
            )
            call.detail["consent"] = "approved"
        if op.state_changing:
            await self._audit(call, decision="allowed", outcome="pending")
        call.acting = True
        ctx = Context(
            self.config, principal, self.admin, reader, verdict, facts, call.detail, call.request_id
        )
        return await HANDLERS[op.name](ctx)

    # --- plans ------------------------------------------------------------------------------

    async def _propose(self, principal: Principal, args: dict[str, Any]) -> dict[str, Any]:
        """Decide every step without acting (plans.py); keep the plan if none is refused."""
        reader = FleetReader(self.admin, principal.scope)
        steps: list[PlanStep] = []
        report: list[dict[str, Any]] = []
        created: set[str] = set()
        for index, raw in enumerate(args["steps"]):
            op = OPERATIONS_BY_NAME[raw["op"]]
            target = raw["target"]
            entry: dict[str, Any] = {"index": index, "op": op.name, "target": target}
            try:
                step_args = check_payload(
                    op, json.dumps(raw["args"]).encode(), name_prefix=principal.name_prefix
                )
                deferred = bool(created & set(self._names(op, target, step_args)))
                consent = op.consent or op.name in self.config.consent.operations
                if not deferred:
                    verdict, _ = await self._read_and_decide(
                        reader, principal, op, target, step_args
                    )
                    consent = verdict.consent
                    step_args = dict(verdict.args)
            except GateError as exc:
                entry["verdict"] = exc.to_reply()["error"]
                report.append(entry)
                continue
            if op.creates and step_args.get("name"):
                created.add(step_args["name"])
            steps.append(PlanStep(index, op, target, step_args, deferred, consent))
            entry.update(verdict="deferred" if deferred else "allowed", consent=consent)
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
            call.detail["consent_id"] = await self.consent.ask(
                principal=principal.qube,
                op="plan.apply",
                target="dom0",
                args={"plan": plan.id, "digest": plan.digest},
                description=plan.describe(),
                reasons=tuple(
                    f"step {s.index + 1}: {s.op.name} needs consent"
                    for s in plan.steps
                    if s.consent
                ),
            )
            call.detail["consent"] = "approved"
        await self._audit(call, decision="allowed", outcome="pending")
        call.acting = True
        done: list[dict[str, Any]] = []
        for step in plan.steps:
            reply = await self._handle(
                Request(
                    step.op.service, principal.qube, step.target, json.dumps(step.args).encode()
                ),
                preapproved=plan.needs_consent,
                detail={"plan_id": plan.id, "step": step.index},
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
