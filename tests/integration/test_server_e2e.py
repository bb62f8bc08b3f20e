"""Every tool through the MCP protocol against the emulator with the real gate.

FastMCP's in-memory client → ``build_server(SimTransport)`` → the emulator's qrexec router as
``mcp-control`` → the generated policy → the gate (installed with ``qubes-mcp-admin install
--root``) → qubesd. Each tool succeeds at the tier it needs, each refusal is the gate's (or
qrexec's, which reads the same), and consent operations wait for the operator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from qubes_mcp.server.app import build_server
from qubes_mcp.server.transport import SimTransport, Timeouts
from qubes_mcp.stack import Stack, start_stack

pytestmark = pytest.mark.bwrap

NOT_FOUND = "not-found: no such qube, or not yours"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("server") / "root")
    try:
        yield s
    finally:
        s.stop()


def tool(stack: Stack, name: str, /, **args: Any) -> dict[str, Any]:
    """Call one tool through the MCP protocol; a refusal raises ToolError."""

    async def go() -> dict[str, Any]:
        server = build_server(SimTransport(stack.root), timeouts=Timeouts(consent=60))
        async with Client(server) as client:
            result = await client.call_tool(name, args)
            return result.structured_content or {}

    return asyncio.run(go())


def refusal(stack: Stack, name: str, /, **args: Any) -> str:
    with pytest.raises(ToolError) as info:
        tool(stack, name, **args)
    return str(info.value)


@contextlib.contextmanager
def operator(stack: Stack, answer: str, op: str, timeout: float = 60) -> Iterator[None]:
    """A scripted operator in dom0 answering the next pending ``op`` during the block; it
    stops with the block, so a request that never arrived cannot be answered later."""
    stop = threading.Event()
    answered: list[str] = []

    def run() -> None:
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:  # bounded wait for pending
            listed = stack.admin("pending", "--json")
            for item in json.loads(listed.stdout or "[]"):
                if item["op"] == op:
                    stack.admin(answer, item["id"])
                    answered.append(item["id"])
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert answered, f"no {op} request reached the operator"


# --- read -------------------------------------------------------------------------------------


def test_qube_list_shows_the_scope_with_tiers(stack: Stack) -> None:
    listed = tool(stack, "qube_list")
    tiers = {q["name"]: q["tier"] for q in listed["qubes"]}
    assert tiers["ai-dev"] == "exec" and tiers["ai-build"] == "full"
    assert "vault" not in tiers and "mcp-control" not in tiers
    assert listed["name_prefix"] == "ai-"


def test_capabilities_add_the_tools_and_their_tiers(stack: Stack) -> None:
    caps = tool(stack, "capabilities_get")
    assert caps["tools"]["qube_remove"] == "full"
    assert {q["name"] for q in caps["qubes"]} == {
        q["name"] for q in tool(stack, "qube_list")["qubes"]
    }


def test_qube_info_is_redacted_by_the_gate(stack: Stack) -> None:
    info = tool(stack, "qube_info", qube="ai-dev")
    assert info["properties"]["template"] == "<out-of-scope>"
    assert info["tags"] == ["ai-managed"]


@pytest.mark.parametrize("hidden", ["vault", "no-such-qube", "dom0", "mcp-control", "ai-dump"])
def test_out_of_scope_qubes_are_not_found(stack: Stack, hidden: str) -> None:
    assert refusal(stack, "qube_info", qube=hidden) == NOT_FOUND
    assert refusal(stack, "qube_run", qube=hidden, command=["id"]) == NOT_FOUND


def test_firewall_get(stack: Stack) -> None:
    assert tool(stack, "firewall_get", qube="ai-web")["qube"] == "ai-web"


def test_devices_list_shows_the_sandbox_disk(stack: Stack) -> None:
    tool(stack, "qube_start", qube="ai-usb")  # a backend exposes its devices while running
    devices = tool(stack, "devices_list", qube="ai-usb")
    assert any(d.get("port_id") == "sdb" for d in devices["exposed"]), devices


def test_events_watch_for_a_bounded_window(stack: Stack) -> None:
    events = tool(stack, "events_watch", seconds=1, qube="ai-dev")
    assert events["seconds"] == 1 and isinstance(events["events"], list)


def test_budget_get(stack: Stack) -> None:
    budget = tool(stack, "budget_get")
    assert budget["pool_cap"] > 0 and budget["max_qubes"] == 32


# --- power and exec ---------------------------------------------------------------------------


def test_power_cycle_of_an_exec_qube(stack: Stack) -> None:
    assert tool(stack, "qube_start", qube="ai-dev")["state"] == "Running"
    assert tool(stack, "qube_pause", qube="ai-dev")["state"] == "Paused"
    assert tool(stack, "qube_unpause", qube="ai-dev")["state"] == "Running"
    assert tool(stack, "qube_shutdown", qube="ai-dev", force=True)["state"] == "Halted"
    tool(stack, "qube_start", qube="ai-dev")
    assert tool(stack, "qube_kill", qube="ai-dev")["state"] == "Halted"


def test_read_tier_refuses_power_and_exec(stack: Stack) -> None:
    assert refusal(stack, "qube_start", qube="ai-notes").startswith("insufficient-tier: ")
    assert refusal(stack, "qube_run", qube="ai-notes", command=["id"]).startswith(
        "insufficient-tier: "
    )


def test_qube_run_as_root_with_stdin(stack: Stack) -> None:
    result = tool(stack, "qube_run", qube="ai-dev", command=["sh", "-c", "id -u; cat"], stdin="x")
    assert (result["exit_code"], result["stdout"]) == (0, "0\nx")


def test_disposable_run(stack: Stack) -> None:
    result = tool(stack, "disposable_run", template="ai-dvm", command=["echo", "hi"])
    assert result["stdout"] == "hi\n" and result["disposable"].startswith("disp")


def test_file_copy_into_the_dump_sink(stack: Stack) -> None:
    tool(stack, "qube_run", qube="ai-dev", command=["sh", "-c", "echo hi > /home/user/n"])
    result = tool(
        stack, "file_copy", source="ai-dev", destination="ai-dump", paths=["/home/user/n"]
    )
    assert result["copied"] is True, result


# --- network, create, config, devices, remove ------------------------------------------------


def test_firewall_set_waits_for_the_operator(stack: Stack) -> None:
    rules = [{"action": "accept", "proto": "tcp", "dsthost": "example.com", "dstports": 443}]
    with operator(stack, "approve", "firewall.set"):
        replaced = tool(stack, "firewall_set", qube="ai-web", rules=[*rules, {"action": "drop"}])
    assert replaced == {"qube": "ai-web", "rules": 2}
    assert refusal(stack, "firewall_set", qube="ai-dev", rules=rules).startswith(
        "insufficient-tier: "
    )


def test_a_denied_request_is_consent_denied(stack: Stack) -> None:
    with operator(stack, "deny", "firewall.set"):
        refused = refusal(stack, "firewall_set", qube="ai-web", rules=[{"action": "drop"}])
    assert refused == "consent-denied: the operator did not approve this request"


def test_create_from_a_template_inside_the_prefix(stack: Stack) -> None:
    created = tool(stack, "qube_create", template="ai-debian", name="ai-new1", label="green")
    assert (created["name"], created["class"], created["label"]) == ("ai-new1", "AppVM", "green")
    assert refusal(stack, "qube_create", template="ai-debian", name="ai-new1").startswith(
        "conflict: "
    )
    assert refusal(stack, "qube_create", template="ai-debian", name="work2").startswith(
        "invalid-input: "
    )


def test_disposable_create(stack: Stack) -> None:
    assert tool(stack, "disposable_create", template="ai-dvm")["class"] == "DispVM"


def test_shutting_a_disposable_down_reports_it_removed(stack: Stack) -> None:
    # qubesd removes a halted disposable itself (auto_cleanup): that is what was asked for
    name = tool(stack, "disposable_create", template="ai-dvm")["name"]
    assert tool(stack, "qube_start", qube=name)["state"] == "Running"
    assert tool(stack, "qube_shutdown", qube=name) == {"qube": name, "state": "Removed"}
    assert name not in {q["name"] for q in tool(stack, "qube_list")["qubes"]}


def test_config_of_a_full_qube(stack: Stack) -> None:
    assert tool(stack, "property_set", qube="ai-build", property="label", value="green") == {
        "qube": "ai-build",
        "property": "label",
        "value": "green",
    }
    assert tool(stack, "feature_set", qube="ai-build", feature="service.cups", value="1")[
        "feature"
    ] == ("service.cups")
    retarget = refusal(stack, "property_set", qube="ai-build", property="netvm", value="ai-web")
    assert retarget.startswith("not-allowed: ")
    not_writable = refusal(stack, "feature_set", qube="ai-build", feature="gui", value="0")
    assert not_writable.startswith("not-allowed: ")
    assert refusal(stack, "property_set", qube="ai-dev", property="label", value="red").startswith(
        "insufficient-tier: "
    )


def test_device_attach_and_detach_wait_for_the_operator(stack: Stack) -> None:
    tool(stack, "qube_start", qube="ai-usb")
    tool(stack, "qube_start", qube="ai-build")  # devices attach between running qubes
    with operator(stack, "approve", "device.attach"):
        attached = tool(stack, "device_attach", qube="ai-build", backend="ai-usb", device="sdb")
    assert (attached["frontend"], attached["device"]) == ("ai-build", "sdb")
    listed = tool(stack, "devices_list", qube="ai-build")["attached"]
    assert {"backend": "ai-usb", "port_id": "sdb"}.items() <= listed[0].items(), listed
    with operator(stack, "approve", "device.detach"):
        tool(stack, "device_detach", qube="ai-build", backend="ai-usb", device="sdb")
    assert tool(stack, "devices_list", qube="ai-build")["attached"] == []


def test_clone_then_remove_a_full_qube(stack: Stack) -> None:
    assert tool(stack, "qube_clone", qube="ai-build", name="ai-clone1")["tier"] == "full"
    with operator(stack, "approve", "qube.remove"):
        removed = tool(stack, "qube_remove", qube="ai-clone1")
    assert removed == {"qube": "ai-clone1", "removed": True}
    assert "ai-clone1" not in {q["name"] for q in tool(stack, "qube_list")["qubes"]}


# --- binary files and bytes through commands ------------------------------------------------------

EVERY_BYTE = bytes(range(256)) * 3


def test_binary_files_go_in_and_come_out_exactly(stack: Stack) -> None:
    data = base64.b64encode(EVERY_BYTE).decode()
    written = tool(stack, "file_write", qube="ai-dev", path="/home/user/blob.bin", data=data)
    assert written["written"] == len(EVERY_BYTE)
    assert written["sha256"] == hashlib.sha256(EVERY_BYTE).hexdigest()
    # create refuses an existing file; append adds to it
    assert "cannot write" in refusal(
        stack, "file_write", qube="ai-dev", path="/home/user/blob.bin", data=data
    )
    tool(stack, "file_write", qube="ai-dev", path="/home/user/blob.bin", data="AAE=", mode="append")
    whole = tool(stack, "file_read", qube="ai-dev", path="/home/user/blob.bin")
    assert base64.b64decode(whole["data"]) == EVERY_BYTE + b"\0\1"
    assert (whole["file_size"], whole["eof"]) == (len(EVERY_BYTE) + 2, True)
    part = tool(
        stack, "file_read", qube="ai-dev", path="/home/user/blob.bin", offset=250, length=10
    )
    assert base64.b64decode(part["data"]) == (EVERY_BYTE + b"\0\1")[250:260]
    assert (part["length"], part["eof"]) == (10, False)
    # a path with shell syntax is one argument, never a script
    odd = "/home/user/a file; touch pwned $(id)"
    tool(stack, "file_write", qube="ai-dev", path=odd, data="eA==")
    listing = tool(stack, "qube_run", qube="ai-dev", command=["ls", "/home/user"])["stdout"]
    assert "a file; touch pwned $(id)" in listing and "pwned\n" not in listing


def test_reading_a_missing_file_is_an_error(stack: Stack) -> None:
    text = refusal(stack, "file_read", qube="ai-dev", path="/no/such/file")
    assert text.startswith("invalid-input: cannot read the file in the qube")


def test_commands_take_and_give_exact_bytes_in_base64(stack: Stack) -> None:
    sent = base64.b64encode(EVERY_BYTE).decode()
    out = tool(
        stack, "qube_run", qube="ai-dev", command=["cat"], stdin_base64=sent, output="base64"
    )
    assert base64.b64decode(out["stdout_base64"]) == EVERY_BYTE
    assert "stdout" not in out and out["exit_code"] == 0
    # text stays the default
    assert tool(stack, "qube_run", qube="ai-dev", command=["echo", "hi"])["stdout"] == "hi\n"
    assert refusal(
        stack, "qube_run", qube="ai-dev", command=["cat"], stdin="x", stdin_base64="eA=="
    ).startswith("invalid-input: give stdin_base64 or stdin, not both")


def test_the_audit_log_records_path_size_and_hash_never_the_bytes(stack: Stack) -> None:
    secret = b"top secret bytes"
    tool(
        stack,
        "file_write",
        qube="ai-dev",
        path="/home/user/secret.txt",
        data=base64.b64encode(secret).decode(),
        mode="overwrite",
    )
    log = (stack.root / "var/log/qubes-mcp/audit.log").read_text()
    line = [json.loads(x) for x in log.splitlines() if '"file.write"' in x][-1]
    assert line["detail"]["path"] == "/home/user/secret.txt"
    assert line["detail"]["bytes"] == len(secret)
    assert line["detail"]["data_sha256"] == hashlib.sha256(secret).hexdigest()
    assert "top secret" not in log and base64.b64encode(secret).decode() not in log


# --- every tool below its tier ------------------------------------------------------------------

#: one call per tool on a qube where the principal's tier is one step too low
BELOW_TIER: dict[str, dict[str, Any]] = {
    "qube_start": {"qube": "ai-notes"},
    "qube_shutdown": {"qube": "ai-notes"},
    "qube_pause": {"qube": "ai-notes"},
    "qube_unpause": {"qube": "ai-notes"},
    "qube_kill": {"qube": "ai-notes"},
    "qube_run": {"qube": "ai-notes", "command": ["id"]},
    "template_update": {"template": "ai-notes"},
    "file_copy": {"source": "ai-notes", "destination": "ai-dev", "paths": ["/etc/hostname"]},
    "file_read": {"qube": "ai-notes", "path": "/etc/hostname"},
    "file_write": {"qube": "ai-notes", "path": "/tmp/x", "data": "eA=="},
    "firewall_set": {"qube": "ai-dev", "rules": [{"action": "drop"}]},
    "link_open": {"client": "ai-dev", "server": "ai-web", "port": 8080},
    "link_close": {"client": "ai-notes", "server": "ai-web", "port": 8080},
    "qube_create": {"template": "ai-notes", "name": "ai-below1"},
    "disposable_create": {"template": "ai-notes"},
    "disposable_run": {"template": "ai-notes", "command": ["id"]},
    "qube_clone": {"qube": "ai-dev", "name": "ai-below2"},
    "property_set": {"qube": "ai-dev", "property": "label", "value": "red"},
    "feature_set": {"qube": "ai-dev", "feature": "service.x", "value": "1"},
    "device_attach": {"qube": "ai-dev", "backend": "ai-usb", "device": "sdb"},
    "device_detach": {"qube": "ai-dev", "backend": "ai-usb", "device": "sdb"},
    "qube_remove": {"qube": "ai-dev"},
    "qube_revert": {"qube": "ai-dev"},
}


def test_the_below_tier_list_covers_every_tool_above_read() -> None:
    from qubes_mcp.dom0.operations import OPERATIONS
    from qubes_mcp.dom0.tiers import Tier

    above_read = {op.name.replace(".", "_") for op in OPERATIONS if op.needs > Tier.READ}
    assert set(BELOW_TIER) == above_read


@pytest.mark.parametrize("name", sorted(BELOW_TIER))
def test_each_tool_is_refused_one_tier_too_low(stack: Stack, name: str) -> None:
    assert refusal(stack, name, **BELOW_TIER[name]).startswith("insufficient-tier: needs ")


# --- plans --------------------------------------------------------------------------------------


def test_plan_propose_then_apply_with_one_approval(stack: Stack) -> None:
    steps = [
        {"op": "qube.create", "target": "ai-debian", "args": {"name": "ai-planned"}},
        {"op": "qube.start", "target": "ai-planned", "args": {}},
        {"op": "qube.shutdown", "target": "ai-planned", "args": {}},
    ]
    plan = tool(stack, "plan_propose", steps=steps, title="demo plan")
    assert [s["verdict"]["decision"] for s in plan["steps"]] == ["allowed", "deferred", "deferred"]
    assert plan["needs_consent"] is False
    result = tool(stack, "plan_apply", plan_id=plan["plan_id"], digest=plan["digest"])
    assert (result["completed"], result["stopped_at"]) == (3, None)
    assert tool(stack, "qube_info", qube="ai-planned")["state"] == "Halted"


def test_plan_apply_of_an_unknown_plan_is_refused(stack: Stack) -> None:
    assert refusal(stack, "plan_apply", plan_id="0" * 16, digest="0" * 16).startswith(
        "invalid-input: no such plan"
    )


def test_the_server_learns_dom0s_consent_window_before_a_call_that_may_wait(
    tmp_path: Path,
) -> None:
    """Timeouts are ordered so dom0 answers first: a server started with a shorter consent
    window than the gate's takes dom0's before its first state-changing call."""
    from qubes_mcp.server.gateway import Gateway

    s = start_stack(
        tmp_path / "root",
        config_edit=lambda t: t.replace("[consent]\ntimeout = 120", "[consent]\ntimeout = 300"),
    )
    try:
        gw = Gateway(SimTransport(s.root), Timeouts(consent=10))
        asyncio.run(gw.call(None, "qube.list"))
        assert gw.timeouts.consent == 10  # reads never wait for the operator
        asyncio.run(gw.call(None, "qube.start", "ai-dev"))
        assert gw.timeouts.consent == 300
    finally:
        s.stop()
