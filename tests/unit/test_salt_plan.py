"""``plan show --salt``: every operation kind renders to YAML Salt reads, with the qvm.* state
that does what the gate would do, or a loud failure; agent text never becomes template code."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from qubes_mcp.dom0.errors import GateError
from qubes_mcp.dom0.operations import OPERATIONS, Field, Operation
from qubes_mcp.dom0.operator.salt_plan import render_plan, step_states
from qubes_mcp.dom0.schema import check_field, check_payload

#: an agent's text that Jinja would run, and YAML would misread, if either saw it raw
HOSTILE = "{{ salt['cmd.run']('id') }} {% if 1 %}x{% endif %} \"q\" 'q' #c\n: - é\x1b[2J"

SAMPLE: dict[str, object] = {
    "qube": "ai-b",
    "new_name": "ai-new",
    "bool": True,
    "argv": ["sh", "-c", HOSTILE],
    "text": HOSTILE,
    "base64": "aGk=",
    "rules": [{"action": "accept", "proto": "tcp", "dsthost": "example.org", "dstports": "443"}],
}

#: what each operation kind renders to (the functions of its states, in order)
EXPECTED = {
    "qube.start": ["qvm.start"],
    "qube.shutdown": ["qvm.shutdown"],
    "qube.pause": ["qvm.pause"],
    "qube.unpause": ["qvm.unpause"],
    "qube.kill": ["qvm.kill"],
    "qube.remove": ["qvm.absent"],
    "qube.revert": ["cmd.run"],
    "qube.run": ["test.fail_without_changes"],  # the sample has stdin
    "qube.create": ["qvm.present", "qvm.prefs", "cmd.run", "cmd.run"],
    "qube.clone": ["qvm.clone", "cmd.run"],
    "property.set": ["qvm.prefs"],
    "feature.set": ["qvm.features"],
    "firewall.set": ["qvm.firewall"],
    "device.attach": ["cmd.run"],
    "device.detach": ["cmd.run"],
    "disposable.run": ["test.fail_without_changes"],
    "disposable.create": ["test.fail_without_changes"],
    "file.read": ["test.nop"],
    "file.write": ["test.fail_without_changes"],
    "file.copy": ["test.fail_without_changes"],
    "link.open": ["test.fail_without_changes"],
    "template.update": ["test.fail_without_changes"],
    "link.close": ["test.fail_without_changes"],
}


def _value(f: Field) -> object:
    """The most hostile value the field's schema lets through (so rendering sees it)."""
    if f.kind in SAMPLE:
        return SAMPLE[f.kind]
    if f.kind == "choice":
        return f.choices[-1]
    if f.kind == "int":
        return max(f.minimum or 1, 1)
    printable = HOSTILE.replace("\n", " ").replace("\x1b", "").replace("é", "e")
    for candidate in (HOSTILE, printable, "/tmp/" + printable, "x.y"):
        try:
            return check_field(f, candidate, name_prefix="ai-")
        except GateError:
            continue
    raise AssertionError(f"no sample for {f.name}")


def _step(op: Operation, index: int) -> dict[str, Any]:
    payload = {f.name: _value(f) for f in op.fields if f.name != "stdin_base64"}
    if op.name == "property.set":
        payload = {"property": "label", "value": "red"}
    args = check_payload(op, json.dumps(payload).encode(), name_prefix="ai-")
    return {"index": index, "op": op.name, "target": "ai-t", "args": args}


PLANNABLE = [op for op in OPERATIONS if not op.name.startswith("plan.")]


def _plan(steps: list[dict[str, Any]], title: str = HOSTILE) -> dict[str, Any]:
    return {
        "id": "abc123",
        "principal": "mcp-control",
        "title": title,
        "digest": "d",
        "steps": steps,
    }


def test_every_operation_kind_renders_to_its_states() -> None:
    steps = [_step(op, i) for i, op in enumerate(PLANNABLE)]
    text = render_plan(_plan(steps), "ai")
    assert text.startswith("#!yaml\n")  # Salt's YAML renderer alone: no Jinja pass
    states = yaml.safe_load(text)
    assert list(states) == [
        f"qubes-mcp-plan-abc123-{i}-{n}"
        for i, op in enumerate(PLANNABLE)
        for n in range(len(step_states(steps[i], "ai")))
    ]
    for op, step in zip(PLANNABLE, steps, strict=True):
        functions = [f for f, _ in step_states(step, "ai")]
        assert functions == EXPECTED.get(op.name, ["test.nop"] if op.read_only else []), op.name
    for body in states.values():
        [(function, options)] = body.items()
        assert {"failhard": True} in options, function  # the run stops at the first failure


def test_a_new_operation_is_rendered_deliberately() -> None:
    """An operation added to the table without a rendering fails the build here, rather than
    become a generic 'not expressible' step nobody looked at."""
    for op in PLANNABLE:
        if not op.read_only:
            assert op.name in EXPECTED, f"{op.name}: add its Salt rendering to salt_plan.py"


def test_agent_text_is_data_never_template_code() -> None:
    op = next(op for op in OPERATIONS if op.name == "qube.run")
    step = _step(op, 0)
    step["args"] = {**step["args"], "stdin": ""}
    text = render_plan(_plan([step]), "ai")
    body = text.split("\n", 1)[1]
    for char in "{}%":
        assert char not in body  # not even inside quotes: no renderer can find a template
    assert "\x1b" not in text and "é" not in text
    [(function, options)] = yaml.safe_load(text)["qubes-mcp-plan-abc123-0-0"].items()
    assert function == "qvm.run"
    cmd = next(o["cmd"] for o in options if "cmd" in o)
    assert cmd == "sh -c " + __import__("shlex").quote(HOSTILE)  # the exact words, shell-quoted
    assert HOSTILE.splitlines()[0] in yaml.safe_load(text.splitlines()[2].split("title: ", 1)[1])


@pytest.mark.parametrize(
    ("op", "args", "want"),
    [
        (
            "qube.create",
            {"name": "ai-n", "label": "blue", "network": "none", "disposable_template": True},
            [
                ("qvm.present", [{"name": "ai-n"}, {"template": "ai-t"}, {"label": "blue"}]),
                (
                    "qvm.prefs",
                    [
                        {"name": "ai-n"},
                        {"label": "blue"},
                        {"netvm": "none"},
                        {"template_for_dispvms": True},
                    ],
                ),
                ("cmd.run", [{"name": "qubes-mcp-admin enrol ai-n --scope ai"}]),
            ],
        ),
        (
            "device.attach",
            {"backend": "sys-usb", "device": "sda", "read_only": True},
            [("cmd.run", [{"name": "qvm-device block attach --ro ai-t sys-usb:sda"}])],
        ),
        (
            "device.detach",
            {"backend": "sys-usb", "device": "2-1", "devclass": "usb"},
            [("cmd.run", [{"name": "qvm-device usb detach ai-t sys-usb:2-1"}])],
        ),
        (
            "qube.revert",
            {"revision": "1"},
            [("cmd.run", [{"name": "qvm-volume revert ai-t:private 1"}])],
        ),
        (
            "qube.shutdown",
            {"force": True},
            [("qvm.shutdown", [{"name": "ai-t"}, {"flags": ["wait", "force"]}])],
        ),
        (
            "feature.set",
            {"feature": "gui", "value": ""},
            [("qvm.features", [{"name": "ai-t"}, {"set": [{"gui": ""}]}])],
        ),
        (
            "qube.run",
            {"command": ["id", "-u"]},
            [("qvm.run", [{"name": "ai-t"}, {"cmd": "id -u"}, {"user": "root"}])],
        ),
    ],
)
def test_what_each_state_says(op: str, args: dict[str, Any], want: list[Any]) -> None:
    step = {"index": 0, "op": op, "target": "ai-t", "args": args}
    states = list(yaml.safe_load(render_plan(_plan([step], "t"), "ai")).values())
    assert len(states) == len(want)
    for body, (function, options) in zip(states, want, strict=True):
        [(got_function, got_options)] = body.items()
        assert got_function == function
        for option in options:
            assert option in got_options
        if function == "cmd.run":  # a dom0 command: no shell
            assert {"python_shell": False} in got_options


def test_the_device_is_attached_not_assigned() -> None:
    """The qvm.devices state assigns (the device comes back at every start); the gate's
    attach lasts until shutdown, so the rendering uses qvm-device attach."""
    step = {
        "index": 0,
        "op": "device.attach",
        "target": "ai-t",
        "args": {"backend": "b", "device": "d"},
    }
    assert "qvm.devices" not in render_plan(_plan([step]), "ai")
