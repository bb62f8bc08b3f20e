"""Benchmark: one policy decision on a 500-rule policy (target: well under 1 ms).

Run: ``.venv/bin/python bench/policy_eval.py``. Not part of the test suite (timings vary).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from qubes_mcp.policy import Policy, PolicyError, SystemInfo

DATA = Path(__file__).parents[1] / "tests" / "conformance" / "data"
INFO = SystemInfo.from_json(json.loads((DATA / "policy_qrexec_system_info.json").read_text()))


def build_policy() -> Policy:
    """500 rules of the shapes a generated qubes-mcp policy uses, the match near the end."""
    lines = []
    for i in range(124):
        lines += [
            f"qmcp.Op{i} * test-vm1 @tag:tag{i} allow target=@adminvm",
            f"qmcp.Op{i} * test-vm1 @anyvm deny notify=no",
            f"qubes.Svc{i} +arg{i} @tag:tag2 @dispvm:@tag:tag3 ask default_target=@dispvm",
            "* * @type:TemplateVM uuid:00000000-0000-0000-0000-000000000000 deny",
        ]
    lines += [
        "qubes.Filecopy * @tag:tag1 @tag:tag2 ask",
        "qubes.VMShell * @anyvm @dispvm allow",
        "* * @tag:tag2 @anyvm allow autostart=no",
        "* * @anyvm @anyvm deny",
    ]
    return Policy.from_texts({"30-bench.policy": "\n".join(lines)})


def bench(policy: Policy, service: str, target: str, rounds: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        with contextlib.suppress(PolicyError):
            policy.evaluate(
                service=service, argument="+", source="test-vm1", target=target, system_info=INFO
            )
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    start = time.perf_counter()
    policy = build_policy()
    print(f"parse {len(policy.rules)} rules: {(time.perf_counter() - start) * 1e3:.1f} ms")
    for service, target in [
        ("qmcp.Op3", "test-vm2"),
        ("qubes.Filecopy", "test-vm2"),
        ("qubes.VMShell", "@dispvm"),
        ("qubes.Other", "test-vm2"),
        ("qubes.Other", "dom0"),
    ]:
        print(f"{service:16} -> {target:10} {bench(policy, service, target):8.1f} us/decision")


if __name__ == "__main__":
    main()
