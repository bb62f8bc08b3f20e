"""qrexec policy evaluation (issue 2): time per decision with a 500-rule policy.

The worst-case policy here makes every rule apply to every service (service ``*`` fillers),
so the per-service index cannot skip any and each decision walks the list:

- ``first``: the request matches rule 1;
- ``last``: the request matches rule 500, after 498 rules that fail on the source or the
  target;
- ``no-match``: no rule matches (qrexec: ``no matching rule found``, a refusal);
- ``deny``: an explicit ``deny`` at rule 499;
- ``ask``: an ``ask`` with target ``@anyvm`` at rule 498, which makes the engine collect every
  target the rules above and below offer (the list qrexec shows in the dialog).

``generated-*`` rows use ``bench/policy_eval.py``'s policy instead: 500 rules in the shapes a
generated qubes-mcp policy has, spread over many services, as the gate's policy really is.
The fleet is the one of the conformance tests (``tests/conformance/data``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from bench.common import Budget, Result, measure
from bench.policy_eval import INFO, build_policy
from qubes_mcp.policy import AccessDenied, AskResolution, Policy, PolicyError

RULES = 500
BUDGET = Budget(count=20000, seconds=2.0, warmup=50)
PARSE_BUDGET = Budget(count=50, seconds=3.0, warmup=2)

_FILLERS = (
    "* * test-vm1 @tag:nope{i} allow",  # source matches, target does not
    "* * test-vm2 @anyvm deny",  # source (a name) does not match
    "* * @tag:nope{i} @anyvm allow",  # source does not match
    "* * test-vm1 @dispvm:@tag:nope{i} ask",  # source matches, target does not
)


def worst_case_text(rules: int = RULES) -> str:
    """``rules`` rules, every one of which a request for any service must look at."""
    lines = ["bench.First * test-vm1 test-vm2 allow"]
    lines += [_FILLERS[i % len(_FILLERS)].format(i=i) for i in range(rules - 4)]
    lines += [
        "bench.Ask * test-vm1 @anyvm ask default_target=test-vm2",
        "bench.Deny * @anyvm @anyvm deny",
        "bench.Last * test-vm1 test-vm3 allow",
    ]
    return "\n".join(lines) + "\n"


def _decider(policy: Policy, service: str, target: str) -> Callable[[], object]:
    def decide() -> object:
        with contextlib.suppress(PolicyError):
            return policy.evaluate(
                service=service, argument="+", source="test-vm1", target=target, system_info=INFO
            )
        return None

    return decide


def _outcome(policy: Policy, service: str, target: str) -> str:
    try:
        resolution = policy.evaluate(
            service=service, argument="+", source="test-vm1", target=target, system_info=INFO
        )
    except AccessDenied as exc:
        return f"denied ({exc})"
    if isinstance(resolution, AskResolution):
        return f"ask, {len(resolution.targets_for_ask)} targets collected"
    rule = resolution.rule
    return f"allow → {resolution.target} (rule {rule.lineno})"


def run(quick: bool) -> list[Result]:
    budget = BUDGET.scaled(quick)
    text = worst_case_text()
    parse = measure(
        lambda: Policy.from_texts({"30-bench.policy": text}), PARSE_BUDGET.scaled(quick)
    )
    results = [
        Result.from_sample(
            "policy.parse",
            f"Policy.from_texts, {RULES} rules",
            parse,
            notes="once per policy change (the router reloads on stat change)",
        )
    ]
    policy = Policy.from_texts({"30-bench.policy": text})
    assert len(policy.rules) == RULES
    cases = (
        ("first", "bench.First", "test-vm2"),
        ("last", "bench.Last", "test-vm3"),
        ("no-match", "bench.None", "test-vm2"),
        ("deny", "bench.Deny", "test-vm2"),
        ("ask", "bench.Ask", "test-vm2"),
    )
    for label, service, target in cases:
        results.append(
            Result.from_sample(
                f"policy.{label}",
                f"evaluate {service} test-vm1→{target}, {RULES} rules all applicable",
                measure(_decider(policy, service, target), budget),
                notes=_outcome(policy, service, target),
            )
        )
    generated = build_policy()
    for label, service, target in (
        ("generated-early", "qmcp.Op3", "test-vm2"),
        ("generated-late", "qubes.Other", "test-vm2"),
    ):
        results.append(
            Result.from_sample(
                f"policy.{label}",
                f"evaluate {service} test-vm1→{target}, {len(generated.rules)} generated-shape",
                measure(_decider(generated, service, target), budget),
                notes=_outcome(generated, service, target),
            )
        )
    return results
