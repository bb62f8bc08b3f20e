"""Power states: legal transitions, R4.3 errors, the netvm chain and the event sequences."""

from __future__ import annotations

import pytest

from tests.qubesd_fixtures import EventStream, Qubesd, demo_fixture, err, ok  # noqa: F401 - fixture

# (setup calls, call, expected reply, resulting power state of "work")
TRANSITIONS = {
    "start halted": ([], "admin.vm.Start", ok(), "Running"),
    "start running is a no-op": (["admin.vm.Start"], "admin.vm.Start", ok(), "Running"),
    "pause running": (["admin.vm.Start"], "admin.vm.Pause", ok(), "Paused"),
    "unpause paused": (["admin.vm.Start", "admin.vm.Pause"], "admin.vm.Unpause", ok(), "Running"),
    "shutdown running": (["admin.vm.Start"], "admin.vm.Shutdown", ok(), "Halted"),
    "kill running": (["admin.vm.Start"], "admin.vm.Kill", ok(), "Halted"),
    "kill paused": (["admin.vm.Start", "admin.vm.Pause"], "admin.vm.Kill", ok(), "Halted"),
    "start paused is a no-op": (
        ["admin.vm.Start", "admin.vm.Pause"],
        "admin.vm.Start",
        ok(),
        "Paused",
    ),
    "shutdown halted": (
        [],
        "admin.vm.Shutdown",
        err("QubesVMNotStartedError", "Domain is powered off: 'work'"),
        "Halted",
    ),
    "kill halted": (
        [],
        "admin.vm.Kill",
        err("QubesVMNotStartedError", "Domain is powered off: 'work'"),
        "Halted",
    ),
    "pause halted": (
        [],
        "admin.vm.Pause",
        err(
            "QubesVMNotRunningError",
            "Domain not running (either powered off or paused): 'work'",
        ),
        "Halted",
    ),
    "pause paused is a no-op (libxl)": (
        ["admin.vm.Start", "admin.vm.Pause"],
        "admin.vm.Pause",
        ok(),
        "Paused",
    ),
    "suspend running": (["admin.vm.Start"], "admin.vm.Suspend", ok(), "Suspended"),
    "resume suspended": (
        ["admin.vm.Start", "admin.vm.Suspend"],
        "admin.vm.Resume",
        ok(),
        "Running",
    ),
    "resume paused unpauses": (
        ["admin.vm.Start", "admin.vm.Pause"],
        "admin.vm.Resume",
        ok(),
        "Running",
    ),
    "suspend halted": (
        [],
        "admin.vm.Suspend",
        err(
            "QubesVMNotRunningError",
            "Domain not running (either powered off or paused): 'work'",
        ),
        "Halted",
    ),
    "resume running": (
        ["admin.vm.Start"],
        "admin.vm.Resume",
        err("QubesVMNotPausedError", "Domain is not paused: 'work'"),
        "Running",
    ),
    "unpause running": (
        ["admin.vm.Start"],
        "admin.vm.Unpause",
        err("QubesVMNotPausedError", "Domain is not paused: 'work'"),
        "Running",
    ),
    "shutdown paused without force": (
        ["admin.vm.Start", "admin.vm.Pause"],
        "admin.vm.Shutdown",
        err(
            "QubesVMNotRunningError",
            "Domain not running (either powered off or paused): 'work'",
        ),
        "Paused",
    ),
}


@pytest.mark.parametrize("case", list(TRANSITIONS.values()), ids=list(TRANSITIONS))
def test_transition_table(demo: Qubesd, case: tuple[list[str], str, bytes, str]) -> None:
    setup, method, expected, state = case
    for step in setup:
        assert demo.call("work", step) == ok()
    assert demo.call("work", method) == expected
    assert demo.call("work", "admin.vm.CurrentState").endswith(f"power_state={state}".encode())


def test_shutdown_force_of_paused(demo: Qubesd) -> None:
    demo.call("work", "admin.vm.Start")
    demo.call("work", "admin.vm.Pause")
    assert demo.call("work", "admin.vm.Shutdown", "force") == ok()
    assert b"power_state=Halted" in demo.call("work", "admin.vm.CurrentState")


def test_dom0_power_errors(demo: Qubesd) -> None:
    assert demo.call("dom0", "admin.vm.Start") == err(
        "QubesVMNotHaltedError", "Cannot start Dom0 fake domain!"
    )
    assert demo.call("dom0", "admin.vm.Kill") == err(
        "QubesVMError", "Cannot kill Dom0 fake domain!"
    )
    assert demo.call("dom0", "admin.vm.Pause") == b""


def test_start_brings_up_the_netvm_chain_first(demo: Qubesd) -> None:
    stream = EventStream(demo)
    try:
        stream.wait_for(lambda ev: ("", "connection-established", {}) in ev)
        assert demo.call("ai-dev", "admin.vm.Start") == ok()
        stream.wait_for(lambda ev: ("ai-dev", "domain-start", {"start_guid": "True"}) in ev)
        starts = [s for s, e, _ in stream.events if e == "domain-start"]
        assert starts == ["sys-net", "sys-firewall", "ai-egress", "ai-dev"]
        pre = [s for s, e, _ in stream.events if e == "domain-pre-start"]
        assert pre == ["ai-dev", "ai-egress", "sys-firewall", "sys-net"]
    finally:
        stream.close()


def test_start_event_sequence_is_r43(demo: Qubesd) -> None:
    stream = EventStream(demo, dest="vault")
    try:
        stream.wait_for(lambda ev: len(ev) == 1)
        demo.call("vault", "admin.vm.Start")
        stream.wait_for(lambda ev: "domain-start" in [e for _, e, _ in ev])
        assert stream.names() == [
            "connection-established",
            "domain-pre-start",
            "domain-pre-spawn",
            "property-reset:xid",
            "property-reset:stubdom_xid",
            "property-reset:start_time",
            "domain-spawn",
            "domain-pre-unpaused",
            "domain-unpaused",
            "domain-start",
        ]
        assert stream.events[1][2] == {"start_guid": "True", "mem_required": "None"}
        demo.call("vault", "admin.vm.Shutdown")
        stream.wait_for(lambda ev: "domain-shutdown" in [e for _, e, _ in ev])
        assert stream.names()[10:] == [
            "domain-pre-shutdown",
            "domain-stopped",
            "property-reset:xid",
            "property-reset:stubdom_xid",
            "property-reset:start_time",
            "domain-shutdown",
        ]
    finally:
        stream.close()


def test_netvm_with_running_clients_needs_force(demo: Qubesd) -> None:
    demo.call("ai-dev", "admin.vm.Start")
    assert demo.call("ai-egress", "admin.vm.Shutdown") == err(
        "QubesVMInUseError", "There are other VMs connected to this VM: ai-dev"
    )
    assert b"power_state=Running" in demo.call("ai-egress", "admin.vm.CurrentState")
    assert demo.call("ai-egress", "admin.vm.Shutdown", "force") == ok()


def test_prohibit_start(demo: Qubesd) -> None:
    demo.call("work", "admin.vm.feature.Set", "prohibit-start", b"under repair")
    assert demo.call("work", "admin.vm.Start") == err(
        "QubesException", "Qube start is prohibited. Rationale: under repair"
    )
    assert b"power_state=Halted" in demo.call("work", "admin.vm.CurrentState")


def test_remove_needs_halted(demo: Qubesd) -> None:
    demo.call("vault", "admin.vm.Start")
    before = demo.snapshot()
    assert demo.call("vault", "admin.vm.Remove") == err(
        "QubesVMNotHaltedError", "Domain is not powered off: 'vault'"
    )
    assert demo.snapshot() == before


def test_template_change_needs_halted(demo: Qubesd) -> None:
    demo.call("work", "admin.vm.Start")
    assert demo.call("work", "admin.vm.property.Set", "template", b"debian-13-xfce") == err(
        "QubesVMNotHaltedError", "Cannot change template while qube is running"
    )


def test_disposable_is_removed_when_it_stops(demo: Qubesd) -> None:
    reply = demo.call("dom0", "admin.vm.CreateDisposable", "", b"", src="ai-dvm")
    name = reply[2:].decode()
    assert name.startswith("disp")
    # ai-dvm's default_dispvm is itself: the disposable inherits its tags (R4.3 dispvm.py:405)
    assert demo.call(name, "admin.vm.tag.List") == ok(
        "ai-exec\nai-managed\naudiovm-dom0\ncreated-by-ai-dvm\ndisp-created-by-ai-dvm\nguivm-dom0\n"
    )
    assert demo.call(name, "admin.vm.property.Get", "auto_cleanup") == ok(
        "default=False type=bool True"
    )
    assert demo.call(name, "admin.vm.Start") == ok()
    assert demo.call(name, "admin.vm.Kill") == ok()
    assert demo.call(name, "admin.vm.List") == err(
        "QubesVMNotFoundError", f"No such domain: {name!r}"
    )


def test_create_disposable_uuid_payload(demo: Qubesd) -> None:
    reply = demo.call("default-dvm", "admin.vm.CreateDisposable", "", b"uuid")
    assert reply.startswith(b"0\0uuid:") and len(reply) == 2 + 41
    assert demo.call(reply[2:].decode(), "admin.vm.property.Get", "template") == ok(
        "default=False type=vm default-dvm"
    )


def test_running_qube_cannot_attach_to_a_stopped_netvm(demo: Qubesd) -> None:
    demo.call("mcp-control", "admin.vm.Start")
    before = demo.snapshot()
    assert demo.call("mcp-control", "admin.vm.property.Set", "netvm", b"ai-egress") == err(
        "QubesVMNotStartedError", "Cannot dynamically attach to stopped qube ai-egress"
    )
    assert demo.snapshot() == before
    demo.call("ai-egress", "admin.vm.Start")
    assert demo.call("mcp-control", "admin.vm.property.Set", "netvm", b"ai-egress") == ok()


def test_netvm_reset_is_checked_like_a_set(demo: Qubesd) -> None:
    # sys-firewall is the global default netvm; its netvm explicitly sys-net. Resetting it
    # would make it its own netvm: the setter's loop check refuses it.
    assert demo.call("sys-firewall", "admin.vm.property.Reset", "netvm") == err(
        "QubesValueError", "Loops in network are unsupported"
    )
