"""A proposed plan as a Salt state, with the ``qvm.*`` states Qubes ships (``plan show --salt``).

The seed discussion names Salt (``qubesctl``) as the executor of a reviewed plan. The gate
still applies plans itself, deciding each step again right before it acts; this rendering is
for an operator who would rather read a plan, or apply it, the way Qubes configures itself.

What the rendering promises:

- **All of the plan, or a loud failure.** Each step becomes its states, in the plan's order,
  each with ``failhard: True`` (the run stops at the first failing step, as the gate's does).
  A step no ``qvm.*`` state can express as the gate would do it (a copy relayed by dom0, a
  command with stdin, bytes written into a qube, a disposable whose name dom0 picks) becomes a
  ``test.fail_without_changes`` state naming the step: applying the file never silently does
  less than the plan. A read (``qube.info``, ``file.read`` …) changes nothing and becomes a
  ``test.nop`` in its place.
- **No agent text is code.** The file starts with ``#!yaml``, so Salt renders it with the YAML
  renderer alone, never Jinja; and every string is a double-quoted scalar in which ``{``,
  ``}``, ``%`` and everything outside printable ASCII are ``\\u`` escapes, so no renderer
  could find a template in it either. A command for a qube is shell-quoted words
  (``shlex.join``), and a command for dom0 runs with ``python_shell: False`` (no shell).
- **The gate's own acts are named.** A qube the gate creates enters the principal's scope;
  the rendering enrols it with ``qubes-mcp-admin enrol`` as the formula in
  ``packaging/salt`` does.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any

from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME

#: one option of a state: a scalar, or a list of scalars or of one-key mappings
Option = tuple[str, object]
State = tuple[str, list[Option]]

_TEMPLATE_CHARS = re.compile(r"[{}%]")


def quote(value: object) -> str:
    """One YAML double-quoted scalar: JSON's escapes (ASCII only) plus ``{``, ``}``, ``%``."""
    text = json.dumps(str(value), ensure_ascii=True)
    return _TEMPLATE_CHARS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return quote(value)


def _item(value: object) -> str:
    if isinstance(value, tuple):  # a one-key mapping: a feature and its value
        key, inner = value
        return f"{quote(key)}: {_scalar(inner)}"
    return _scalar(value)


def _state(state_id: str, function: str, options: list[Option]) -> list[str]:
    lines = [f"{quote(state_id)}:", f"  {function}:"]
    for key, value in [*options, ("failhard", True)]:
        if isinstance(value, list):
            lines.append(f"    - {key}:")
            lines.extend(f"      - {_item(item)}" for item in value)
        else:
            lines.append(f"    - {key}: {_item(value)}")
    return lines


def _fail(why: str) -> list[State]:
    return [("test.fail_without_changes", [("name", f"not expressible as a qvm.* state: {why}")])]


def _dom0(*argv: str) -> State:
    return ("cmd.run", [("name", shlex.join(argv)), ("python_shell", False)])


def _words(command: object) -> str:
    return shlex.join(str(word) for word in command) if isinstance(command, list) else ""


def _given(value: object) -> list[str]:
    return [] if value in (None, "") else [str(value)]


def _run(target: str, args: Mapping[str, Any]) -> list[State]:
    if args.get("stdin") or args.get("stdin_base64"):
        return _fail(f"a command in {target} with stdin (qvm.run passes no input)")
    cmd = _words(args.get("command"))
    return [("qvm.run", [("name", target), ("cmd", cmd), ("user", "root"), ("flags", ["pass-io"])])]


def _disposable_run(target: str, args: Mapping[str, Any]) -> list[State]:
    if args.get("stdin") or args.get("stdin_base64"):
        return _fail(f"a command in a disposable of {target} with stdin")
    return [_dom0("qvm-run", f"--dispvm={target}", "--pass-io", "--", _words(args.get("command")))]


def _create(target: str, args: Mapping[str, Any], scope: str) -> list[State]:
    name = str(args["name"])
    label = str(args.get("label") or "gray")
    prefs: list[Option] = [("label", label)]
    if args.get("network") == "none":
        prefs.append(("netvm", "none"))
    if args.get("disposable_template"):
        prefs.append(("template_for_dispvms", True))
    states: list[State] = [
        ("qvm.present", [("name", name), ("template", target), ("label", label)]),
        ("qvm.prefs", [("name", name), *prefs]),
    ]
    if args.get("private_size"):
        size = str(args["private_size"])
        states.append(_dom0("qvm-volume", "resize", f"{name}:private", size))
    states.append(_dom0("qubes-mcp-admin", "enrol", name, "--scope", scope))
    return states


def _firewall(target: str, args: Mapping[str, Any]) -> list[State]:
    from qubes_mcp.dom0.firewall import render_rule

    rules = [render_rule(rule) for rule in args.get("rules", [])]
    return [("qvm.firewall", [("name", target), ("set", rules)])]


def _device(action: str, target: str, args: Mapping[str, Any]) -> list[State]:
    # qvm-device, not the qvm.devices state: that one *assigns* (the device comes back at
    # every start); the gate attaches for this session only, as `qvm-device attach` does
    klass = str(args.get("devclass") or "block")
    device = f"{args['backend']}:{args['device']}"
    if action == "detach":
        return [_dom0("qvm-device", klass, "detach", target, device)]
    read_only = ["--ro"] if args.get("read_only") else []
    return [_dom0("qvm-device", klass, "attach", *read_only, target, device)]


#: the steps no ``qvm.*`` state does as the gate does: why, for the failing state's name
_NOT_EXPRESSIBLE = {
    "disposable.create": "a disposable of {t} (dom0 picks its name)",
    "file.write": "bytes written into a file of {t}",
    "file.copy": "a copy from {t} relayed by dom0",
    "template.update": "updating template {t} (Qubes does it with `qubesctl --skip-dom0 "
    "--targets={t} state.sls update.qubes-vm`)",
    "link.open": "a lab link from {t} (the gate's registry and policy)",
    "link.close": "closing a lab link of {t} (the gate's registry)",
}
#: one state of a target and no argument
_PLAIN = {
    "qube.start": "qvm.start",
    "qube.pause": "qvm.pause",
    "qube.unpause": "qvm.unpause",
    "qube.kill": "qvm.kill",
    "qube.remove": "qvm.absent",
}
Render = Callable[[str, Mapping[str, Any], str], list[State]]
#: the rest: (target, args, scope) -> states
_RENDER: dict[str, Render] = {
    "qube.shutdown": lambda t, a, _: [
        ("qvm.shutdown", [("name", t), ("flags", ["wait", *(["force"] * bool(a.get("force")))])])
    ],
    "qube.revert": lambda t, a, _: [
        _dom0("qvm-volume", "revert", f"{t}:private", *_given(a.get("revision")))
    ],
    "qube.run": lambda t, a, _: _run(t, a),
    "qube.create": _create,
    "qube.clone": lambda t, a, s: [
        ("qvm.clone", [("name", str(a["name"])), ("source", t)]),
        _dom0("qubes-mcp-admin", "enrol", str(a["name"]), "--scope", s),
    ],
    "property.set": lambda t, a, _: [
        ("qvm.prefs", [("name", t), (str(a["property"]), a.get("value", ""))])
    ],
    "feature.set": lambda t, a, _: [
        ("qvm.features", [("name", t), ("set", [(str(a["feature"]), a["value"])])])
    ],
    "firewall.set": lambda t, a, _: _firewall(t, a),
    "device.attach": lambda t, a, _: _device("attach", t, a),
    "device.detach": lambda t, a, _: _device("detach", t, a),
    "disposable.run": lambda t, a, _: _disposable_run(t, a),
    "file.read": lambda t, a, _: [("test.nop", [("name", f"file.read in {t}: nothing to apply")])],
}


def step_states(step: Mapping[str, Any], scope: str) -> list[State]:
    """The states of one plan step (``op``, ``target``, ``args`` as the gate keeps them)."""
    op, target, args = str(step["op"]), str(step.get("target") or ""), step.get("args") or {}
    if op in _PLAIN:
        return [(_PLAIN[op], [("name", target)])]
    if op in _RENDER:
        return _RENDER[op](target, args, scope)
    if op in _NOT_EXPRESSIBLE:
        return _fail(_NOT_EXPRESSIBLE[op].format(t=target))
    known = OPERATIONS_BY_NAME.get(op)
    if known is not None and known.read_only:  # a read: nothing to apply, shown in its place
        return [
            ("test.nop", [("name", f"{op} of {target or 'the host'}: a read, nothing to apply")])
        ]
    return _fail(f"operation {op}")


def render_plan(plan: Mapping[str, Any], scope: str) -> str:
    """The whole plan as one ``#!yaml`` Salt state file, steps in order."""
    lines = [
        "#!yaml",
        f"# qubes-mcp plan {quote(plan['id'])} of {quote(plan['principal'])}",
        f"# title: {quote(plan['title'])}",
        f"# digest {quote(plan['digest'])}; {len(plan['steps'])} step(s), applied in order, "
        "stopping at the first failure",
        "# Rendered by `qubes-mcp-admin plan show ID --salt`: the gate applies plans itself;",
        "# this is the same plan in qvm.* states, to read or to apply with qubesctl.",
    ]
    for step in plan["steps"]:
        for n, (function, options) in enumerate(step_states(step, scope)):
            lines.append("")
            lines.extend(
                _state(f"qubes-mcp-plan-{plan['id']}-{step['index']}-{n}", function, options)
            )
    return "\n".join(lines) + "\n"
