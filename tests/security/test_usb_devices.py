"""USB devices through the gate (issue 10 §4): the same rule as block devices -- full on both
ends, the operator's consent on attach and detach, backends only from the scope -- on the
emulator's R4.3 ``admin.vm.device.usb.*``.

The demo fleet: ``ai-usb`` (ai-full) exposes a USB stick on port ``2-1``; ``sys-usb`` (the
operator's, not enrolled) a receiver on ``1-1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

STICK = {"backend": "ai-usb", "device": "2-1", "devclass": "usb"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("usb") / "root")
    try:
        for qube in ("ai-usb", "ai-build", "ai-dev"):
            ok(gate_call(s, qube, "qmcp.Start"))
        dom0_admin(s, "sys-usb", "admin.vm.Start")
        yield s
    finally:
        s.stop()


def _attached(stack: Stack, frontend: str) -> str:
    return dom0_admin(stack, frontend, "admin.vm.device.usb.Attached")


def _with_operator(stack: Stack, answer: str, op: str, target: str, **payload: Any) -> Any:
    operator = answer_when_pending(stack, answer, op=op)
    service = "qmcp.DeviceAttach" if op == "device.attach" else "qmcp.DeviceDetach"
    reply = gate_call(stack, target, service, payload)
    operator.join(timeout=30)
    return reply


def test_a_usb_device_is_listed_with_its_class(stack: Stack) -> None:
    exposed = ok(gate_call(stack, "ai-usb", "qmcp.DevicesList"))["exposed"]
    usb = [d for d in exposed if d["devclass"] == "usb"]
    assert [(d["port_id"], d["product"]) for d in usb] == [("2-1", "Cruzer Blade")]
    assert {d["devclass"] for d in exposed} == {"block", "usb"}


def test_attach_and_detach_wait_for_the_operator_and_are_audited(stack: Stack) -> None:
    reply = _with_operator(stack, "approve", "device.attach", "ai-build", **STICK)
    assert ok(reply) == {
        "frontend": "ai-build",
        "backend": "ai-usb",
        "device": "2-1",
        "devclass": "usb",
        "read_only": False,
    }
    assert _attached(stack, "ai-build").startswith("ai-usb+2-1:")
    attached = ok(gate_call(stack, "ai-build", "qmcp.DevicesList"))["attached"]
    assert attached == [
        {"devclass": "usb", "backend": "ai-usb", "port_id": "2-1", "mode": "manual"}
    ]
    line = audit_lines(stack)[-1]
    assert (line["op"], line["outcome"], line["detail"]["consent"]) == (
        "device.attach",
        "ok",
        "approved",
    )
    assert (line["detail"]["device_class"], line["detail"]["device"]) == ("usb", "2-1")
    reply = _with_operator(stack, "approve", "device.detach", "ai-build", **STICK)
    assert ok(reply)["devclass"] == "usb"
    assert _attached(stack, "ai-build") == ""
    assert audit_lines(stack)[-1]["detail"]["device_class"] == "usb"


def test_a_denied_attach_attaches_nothing(stack: Stack) -> None:
    reply = _with_operator(stack, "deny", "device.attach", "ai-build", **STICK)
    assert code(reply) == "consent-denied"
    assert _attached(stack, "ai-build") == ""


@pytest.mark.parametrize(
    ("target", "payload", "expected"),
    [
        # the operator's sys-usb and its receiver: the one not-found, before any consent
        ("ai-build", {"backend": "sys-usb", "device": "1-1", "devclass": "usb"}, "not-found"),
        ("ai-build", {**STICK, "backend": "no-such-qube"}, "not-found"),
        # full on both ends
        ("ai-dev", STICK, "insufficient-tier"),
        ("ai-build", {**STICK, "backend": "ai-dev"}, "insufficient-tier"),
        # the USB proxy takes no read-only option
        ("ai-build", {**STICK, "read_only": True}, "invalid-input"),
        ("ai-build", {**STICK, "devclass": "pci"}, "invalid-input"),
    ],
    ids=[
        "out-of-scope-backend",
        "missing-backend",
        "exec-frontend",
        "exec-backend",
        "usb-read-only",
        "other-class",
    ],
)
def test_refusals_come_before_consent_and_attach_nothing(
    stack: Stack, target: str, payload: dict[str, Any], expected: str
) -> None:
    assert code(gate_call(stack, target, "qmcp.DeviceAttach", payload)) == expected
    assert "consent" not in audit_lines(stack)[-1]["detail"]
    assert _attached(stack, target) == ""
    assert dom0_admin(stack, "work", "admin.vm.device.usb.Attached") == ""


def test_an_out_of_scope_frontend_is_refused_by_qrexec(stack: Stack) -> None:
    assert gate_call(stack, "work", "qmcp.DeviceAttach", STICK) == {"refused": 126}


def test_an_attachment_to_an_out_of_scope_qube_is_redacted(stack: Stack) -> None:
    dom0_admin(stack, "work", "admin.vm.Start")
    dom0_admin(stack, "work", "admin.vm.device.usb.Attach", "ai-usb+2-1+_", b"")
    try:
        usb = [
            d
            for d in ok(gate_call(stack, "ai-usb", "qmcp.DevicesList"))["exposed"]
            if d["devclass"] == "usb"
        ]
        assert usb[0]["attached_to"] == "<out-of-scope>"
    finally:
        dom0_admin(stack, "work", "admin.vm.device.usb.Detach", "ai-usb+2-1+_")
