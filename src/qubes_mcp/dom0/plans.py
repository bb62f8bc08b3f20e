"""Plans: a whole change checked first, shown to the operator once, then applied step by step.

``plan.propose`` runs every step through the same schema and the same decision as a direct
request, against fresh facts, without acting. A step about a qube that an earlier step of the
same plan creates cannot be decided yet: it is *deferred* and decided when it runs. A plan in
which every step is allowed or deferred is kept (in the daemon's memory, for an hour) under a
random id and the digest of its steps; a plan with any refused step is not kept.

``plan.apply`` needs the id and the digest the proposal returned, so what runs is what was
proposed. If any step needs consent, the operator is asked once, for the whole plan, with every
step described in the same words a single request gets, those that need consent first
(``describe.describe_plan``). Then each step is decided again with fresh facts right before it
acts — an approval covers the steps as shown, never more than the tiers allow — and the plan
stops at the first step that is refused or fails. Steps already done are not undone; the reply
says which ran.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.dom0.errors import InvalidInputError
from qubes_mcp.dom0.operations import Operation

PLAN_TTL = 3600.0
MAX_PLANS_PER_PRINCIPAL = 16


@dataclass(frozen=True)
class PlanStep:
    index: int
    op: Operation
    target: str | None
    args: dict[str, Any]  # schema-checked for op
    deferred: bool
    consent: bool


@dataclass
class Plan:
    id: str
    digest: str
    principal: str
    title: str
    steps: list[PlanStep]
    expires: float = field(default_factory=lambda: time.monotonic() + PLAN_TTL)

    @property
    def needs_consent(self) -> bool:
        return any(step.consent for step in self.steps)


def plan_digest(principal: str, steps: list[PlanStep]) -> str:
    canonical = json.dumps(
        [principal, [[s.op.name, s.target, s.args] for s in steps]], sort_keys=True, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class PlanBook:
    """The proposed plans of one gate daemon."""

    def __init__(self) -> None:
        self._plans: dict[str, Plan] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for plan_id in [p.id for p in self._plans.values() if p.expires < now]:
            del self._plans[plan_id]

    def keep(self, principal: str, title: str, steps: list[PlanStep]) -> Plan:
        self._expire()
        mine = sorted(
            (p for p in self._plans.values() if p.principal == principal), key=lambda p: p.expires
        )
        for old in mine[: max(0, len(mine) - MAX_PLANS_PER_PRINCIPAL + 1)]:
            del self._plans[old.id]
        plan = Plan(secrets.token_hex(8), plan_digest(principal, steps), principal, title, steps)
        self._plans[plan.id] = plan
        return plan

    def public(self) -> list[dict[str, Any]]:
        """Every kept plan as the operator may read it (``qubes-mcp-admin plan``): its steps'
        operations, targets and schema-checked arguments, in order."""
        self._expire()
        now = time.monotonic()
        return [
            {
                "id": plan.id,
                "digest": plan.digest,
                "principal": plan.principal,
                "title": plan.title,
                "seconds_left": int(plan.expires - now),
                "steps": [
                    {
                        "index": step.index,
                        "op": step.op.name,
                        "target": step.target,
                        "args": json.loads(json.dumps(step.args, default=str)),
                        "deferred": step.deferred,
                        "consent": step.consent,
                    }
                    for step in plan.steps
                ],
            }
            for plan in self._plans.values()
        ]

    def take(self, principal: str, plan_id: str, digest: str) -> Plan:
        """The plan, removed from the book (a plan is applied once)."""
        self._expire()
        plan = self._plans.get(plan_id)
        if (
            plan is None
            or plan.principal != principal
            or not secrets.compare_digest(plan.digest, digest)
        ):
            raise InvalidInputError("no such plan (it expired, was applied, or differs)")
        del self._plans[plan_id]
        return plan
