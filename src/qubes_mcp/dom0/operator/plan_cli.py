"""``qubes-mcp-admin plan list | plan show ID [--salt | --json]``: the plans agents proposed.

A plan lives in the gate's memory from ``plan.propose`` until it is applied or expires; the
operator reads it over the operator socket, before the agent asks to apply it. ``--salt``
prints it as a Salt state with the ``qvm.*`` states (salt_plan.py) to read, or to apply with
``qubesctl`` instead of letting the gate apply it. Agent values are escaped as everywhere.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qubes_mcp.dom0.describe import escape
from qubes_mcp.dom0.errors import GateError
from qubes_mcp.dom0.operator.cli_gate import _config, _fail, _operator
from qubes_mcp.dom0.operator.salt_plan import render_plan


def _plans(args: argparse.Namespace) -> list[dict[str, Any]] | int:
    try:
        answer = _operator(args, {"cmd": "plans"})
    except (GateError, OSError) as exc:
        return _fail(f"the gate is not reachable ({type(exc).__name__})")
    if "config_error" in answer:
        return _fail(f"the gate refuses every request: {answer['config_error']}")
    plans = answer.get("plans")
    return plans if isinstance(plans, list) else _fail("the gate keeps no plans")


def _step_line(step: dict[str, Any]) -> str:
    marks = [m for m, on in (("consent", step["consent"]), ("deferred", step["deferred"])) if on]
    args = escape(json.dumps(step["args"], sort_keys=True, ensure_ascii=False))
    flags = f" [{', '.join(marks)}]" if marks else ""
    return f"  {step['index']}. {step['op']} on {escape(str(step['target']))}{flags} {args}"


def cmd_list(args: argparse.Namespace) -> int:
    plans = _plans(args)
    if isinstance(plans, int):
        return plans
    if args.json:
        print(json.dumps(plans, indent=2))
    elif not plans:
        print("no proposed plans")
    for plan in [] if args.json else plans:
        print(
            f"[{plan['id']}] {escape(plan['principal'])}: {escape(plan['title'])} "
            f"({len(plan['steps'])} steps; {plan['seconds_left']}s left; digest {plan['digest']})"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    plans = _plans(args)
    if isinstance(plans, int):
        return plans
    match = [p for p in plans if p["id"] == args.id]
    if not match:
        return _fail(f"no proposed plan {escape(args.id)} (applied, expired, or never kept)")
    plan = match[0]
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    if args.salt:
        principal = _config(args).principals.get(plan["principal"])
        if principal is None:
            return _fail(f"{escape(plan['principal'])} is no longer a principal in the config")
        print(render_plan(plan, principal.scope.prefix), end="")
        return 0
    print(f"[{plan['id']}] {escape(plan['principal'])}: {escape(plan['title'])}")
    print(f"  digest {plan['digest']}; {plan['seconds_left']}s left")
    for step in plan["steps"]:
        print(_step_line(step))
    return 0


def register(sub: Any) -> None:
    """Add ``plan list`` and ``plan show`` to ``qubes-mcp-admin``."""
    plan = sub.add_parser("plan", help="the plans agents proposed (read, or render for Salt)")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    for name, func, help_text in (
        ("list", cmd_list, "list the proposed plans"),
        ("show", cmd_show, "print one proposed plan"),
    ):
        p = plan_sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="configuration file (default: /etc/qubes-mcp/config.toml)")
        p.add_argument("--root", default="/", help="install root (an emulator's root)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
        if name == "show":
            p.add_argument("id")
            p.add_argument(
                "--salt", action="store_true", help="as a Salt state with the qvm.* states"
            )
