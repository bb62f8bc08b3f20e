"""Attacks on the gate, one named test each, on the emulator with the real gate installed.

Names follow the prior art's review (reference/prior-art-inventory.md): ``test_h1_…`` are the
holes of §8.1 by number, ``test_ledger_…`` the findings of its ledger §5.1, and ``test_own_…``
ours. The agent is hostile (root in the control qube, any bytes to any ``qmcp.*`` service) and
so is every sandbox qube where it holds exec (it calls qrexec itself, from inside).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.errors import CODES
from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

NOT_FOUND = {"ok": False, "error": {"code": "not-found", "message": "no such qube, or not yours"}}
REFUSED = {"refused": 126}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("attacks") / "root")
    try:
        yield s
    finally:
        s.stop()


def run_in(stack: Stack, qube: str, *argv: str) -> dict[str, Any]:
    return ok(gate_call(stack, qube, "qmcp.Run", {"command": list(argv)}))


# --- §8.1 holes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["@dispvm", "@dispvm:default-dvm", "personal", "sys-net", "@default", "dom0"]
)
@pytest.mark.parametrize("service", ["qubes.VMShell", "qubes.OpenInVM", "qubes.Filecopy"])
def test_h1_a_sandbox_qube_cannot_call_out_of_the_sandbox(
    stack: Stack, service: str, target: str
) -> None:
    """From inside an exec qube: no disposable, no other qube, no dom0 (stock allows some)."""
    result = run_in(stack, "ai-dev", "qrexec-client-vm", target, service)
    assert result["exit_code"] == 126
    assert "Request refused" in result["stderr"]


def test_h2_template_updates_only_through_the_egress_qube(stack: Stack) -> None:
    policy = stack.root / "etc/qubes/policy.d"
    info = stack.root.parent / "sysinfo.json"
    raw = stack.admin("policy", "explain", "--root", str(stack.root), "--from", "ai-debian")
    assert raw.returncode == 0, raw.stderr
    line = next(ln for ln in raw.stdout.splitlines() if "qubes.UpdatesProxy" in ln)
    targets = {t.split("->")[-1] for t in line.split()[1:]}
    assert targets == {"ai-egress"}, line
    assert policy.exists() and not info.exists()


def test_h3_no_dialog_whose_presence_tells_a_name_exists(stack: Stack) -> None:
    # an existing out-of-scope qube and a made-up name are refused the same way, at once
    for target in ("vault", "no-such-qube"):
        result = run_in(stack, "ai-dev", "qrexec-client-vm", target, "qubes.OpenURL")
        assert (result["exit_code"], result["stderr"]) == (126, "Request refused\n")


@pytest.mark.parametrize(
    "service",
    [
        "admin.vm.List",
        "admin.Events",
        "admin.vm.Create.AppVM",
        "admin.vm.device.block.Available",
        "admin.label.List",
        "policy.List",
        "admin.backup.Execute",
    ],
)
def test_h4_dom0_addressed_calls_from_the_principal_are_denied(stack: Stack, service: str) -> None:
    assert gate_call(stack, "@adminvm", service) == REFUSED
    assert gate_call(stack, "dom0", service) == REFUSED


def test_h5_clone_cannot_mint_templates_or_network_providers(stack: Stack) -> None:
    assert code(gate_call(stack, "ai-debian", "qmcp.Clone", {"name": "ai-tpl2"})) in (
        "insufficient-tier",
        "not-allowed",
    )
    assert (
        code(gate_call(stack, "ai-egress", "qmcp.Clone", {"name": "ai-egress2"}))
        == "insufficient-tier"
    )
    clone = ok(gate_call(stack, "ai-build", "qmcp.Clone", {"name": "ai-build2"}))
    info = ok(gate_call(stack, "ai-build2", "qmcp.Info"))
    assert info["properties"]["provides_network"] is False
    assert info["class"] == "AppVM" and clone["tier"] == "full"


def test_h7_reads_are_an_allowlist(stack: Stack) -> None:
    info = ok(gate_call(stack, "ai-dvm", "qmcp.Info"))
    assert set(info["properties"]) <= {
        "label",
        "template",
        "netvm",
        "default_dispvm",
        "provides_network",
        "template_for_dispvms",
        "memory",
        "maxmem",
        "vcpus",
        "virt_mode",
        "autostart",
        "include_in_backups",
        "uuid",
    }
    for leak in ("qid", "ip", "gateway", "dns", "kernel", "derived_vms", "xid"):
        assert leak not in json.dumps(info["properties"])


@pytest.mark.parametrize(
    "feature",
    [
        "internal",
        "gui-allow-fullscreen",
        "tag-created-vm-with",
        "set-created-guivm",
        "qmcp.x",
        "prohibit-start",
        "preload-dispvm-max",
    ],
)
def test_h8_feature_writes_are_an_allowlist(stack: Stack, feature: str) -> None:
    reply = gate_call(stack, "ai-build", "qmcp.SetFeature", {"feature": feature, "value": "1"})
    assert code(reply) == "not-allowed"


@pytest.mark.parametrize("prop", ["name", "provides_network", "qid", "kernel", "guivm"])
def test_h9_and_g0_1_escalating_properties_are_not_settable(stack: Stack, prop: str) -> None:
    reply = gate_call(stack, "ai-build", "qmcp.SetProperty", {"property": prop, "value": "x"})
    assert code(reply) == "invalid-input"


def test_h10_exec_and_firewall_writes_are_audited_without_their_content(stack: Stack) -> None:
    # the argv is recorded (issue 9 §2: [audit] commands = "argv"), the output never: the
    # command prints SECRET-OUTPUT without that text being in its arguments
    run_in(stack, "ai-dev", "printf", "%s-%s\n", "SECRET", "OUTPUT")
    operator = answer_when_pending(stack, "approve", op="firewall.set")
    ok(
        gate_call(
            stack,
            "ai-web",
            "qmcp.FirewallSet",
            {
                "rules": [
                    {"action": "accept", "dsthost": "example.com", "proto": "tcp", "dstports": 443},
                    {"action": "drop"},
                ]
            },
        )
    )
    operator.join(10)
    lines = audit_lines(stack)
    runs = [ln for ln in lines if ln["op"] == "qube.run" and ln["outcome"] == "ok"]
    fw = [ln for ln in lines if ln["op"] == "firewall.set" and ln["outcome"] == "ok"]
    assert runs and runs[-1]["detail"]["command_sha256"]
    assert runs[-1]["detail"]["argv"] == ["printf", "%s-%s\\x0a", "SECRET", "OUTPUT"]
    assert runs[-1]["detail"]["stdout_bytes"] == len("SECRET-OUTPUT\n")
    assert fw and fw[-1]["detail"]["rule_count"] == 2
    text = json.dumps(lines)
    assert "SECRET-OUTPUT" not in text and "example.com" not in text


def test_h11_no_raw_exception_text_in_any_reply(stack: Stack) -> None:
    replies = [
        gate_call(stack, "ai-dev", "qmcp.Start"),
        gate_call(stack, "ai-dev", "qmcp.Unpause"),  # qubesd: not paused
        gate_call(stack, "ai-build", "qmcp.Pause"),  # qubesd: not running
        gate_call(stack, "ai-dev", "qmcp.Remove"),
    ]
    operator = answer_when_pending(stack, "approve", op="device.detach")
    replies.append(
        gate_call(stack, "ai-build", "qmcp.DeviceDetach", {"backend": "ai-usb", "device": "zz"})
    )
    operator.join(10)
    fixed = {
        "no such qube, or not yours",
        "the qube is not paused",
        "the qube is not running",
        "the request failed; see the dom0 audit log",
    }
    for reply in replies:
        if reply.get("ok") is False:
            assert reply["error"]["code"] in CODES
            message = reply["error"]["message"]
            assert "Qubes" not in message and "Error" not in message, message
            assert message in fixed or reply["error"]["code"] in (
                "insufficient-tier",
                "consent-denied",
                "invalid-state",
            ), message


def test_h12_oversized_requests_are_refused_and_bounded(stack: Stack) -> None:
    big = json.dumps({"command": ["x" * 4000] * 40}).encode()
    reply = json.loads(stack.call("ai-dev", "qmcp.Run", big).stdout)
    assert code(reply) == "invalid-input"
    huge = b'{"command": ["' + b"a" * 200_000 + b'"]}'
    reply = json.loads(stack.call("ai-dev", "qmcp.Run", huge).stdout)
    assert reply["error"]["message"].startswith("request is larger than")
    events = ok(gate_call(stack, "@adminvm", "qmcp.Events", {"seconds": 1}))
    assert events["seconds"] == 1
    assert code(gate_call(stack, "@adminvm", "qmcp.Events", {"seconds": 99999})) == "invalid-input"


def test_h14_h15_a_failed_birth_is_rolled_back_and_reported(tmp_path: Path) -> None:
    """The egress qube cannot provide network here, so setting the new qube's netvm fails
    after the qube exists: it must be removed again, and the audit line says so."""
    fleet = tmp_path / "fleet.toml"
    demo = Path(__file__).resolve().parents[2] / "src/qubes_mcp/sim/data/fleets/demo.toml"
    fleet.write_text(
        demo.read_text().replace(
            'properties = { provides_network = true, netvm = "sys-firewall" }\n\n'
            '[[qube]]\nname = "ai-dev"',
            'properties = { netvm = "sys-firewall" }\n\n[[qube]]\nname = "ai-dev"',
        )
    )
    fleet.write_text(fleet.read_text().replace('netvm = "ai-egress"', 'netvm = ""'))
    s = start_stack(tmp_path / "root", fleet=fleet)
    try:
        reply = gate_call(s, "ai-debian", "qmcp.Create", {"name": "ai-doomed"})
        assert code(reply) == "failed"
        assert "ai-doomed" not in json.dumps(ok(gate_call(s, "@adminvm", "qmcp.List")))
        last = audit_lines(s)[-1]
        assert (last["op"], last["outcome"]) == ("qube.create", "rolled-back")
    finally:
        s.stop()


def test_h17_only_dom0_root_reaches_the_consent_queue(stack: Stack) -> None:
    sock = stack.root / "run/qubes-mcp/operator.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert gate_call(stack, "@adminvm", "qmcp.Approve") == REFUSED


def test_h18_the_operator_sees_what_a_removal_destroys(stack: Stack) -> None:
    seen: list[dict[str, Any]] = []

    def operator() -> None:
        for _ in range(300):
            pending = json.loads(stack.admin("pending", "--json").stdout or "[]")
            if pending:
                seen.extend(pending)
                stack.admin("deny", pending[0]["id"])
                return
            threading.Event().wait(0.1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    assert code(gate_call(stack, "ai-usb", "qmcp.Remove")) == "consent-denied"
    thread.join(10)
    assert seen and "REMOVE qube ai-usb (AppVM, private volume" in seen[0]["description"]
    assert "all data in it will be lost" in seen[0]["description"]


# --- §5.1 findings ledger ------------------------------------------------------------------------


def test_ledger_reviewer_8_cross_reference_refusals_do_not_tell_missing_from_hidden(
    stack: Stack,
) -> None:
    replies = {
        value: gate_call(
            stack, "ai-build", "qmcp.SetProperty", {"property": "default_dispvm", "value": value}
        )
        for value in ("vault", "no-such-qube", "default-dvm")
    }
    assert replies["vault"] == replies["no-such-qube"] == replies["default-dvm"] == NOT_FOUND


def test_ledger_f3_vm_valued_reads_do_not_leak_names(stack: Stack) -> None:
    info = ok(gate_call(stack, "ai-dvm", "qmcp.Info"))
    assert info["properties"]["template"] == "<out-of-scope>"
    assert "debian-13-xfce" not in json.dumps(info)


def test_ledger_i5_created_qubes_carry_only_gate_stamped_scope_tags(stack: Stack) -> None:
    """A disposable inherits every tag of its template and a clone would copy its source's:
    whatever arrives, only the stamp stays (and never a tier above the source)."""
    dom0_admin(stack, "ai-dvm", "admin.vm.tag.Set", "ai-full-looking")
    dom0_admin(stack, "ai-dvm", "admin.vm.tag.Set", "ai-owner-someone-else")
    try:
        disp = ok(gate_call(stack, "ai-dvm", "qmcp.CreateDisposable"))
    finally:
        dom0_admin(stack, "ai-dvm", "admin.vm.tag.Remove", "ai-full-looking")
        dom0_admin(stack, "ai-dvm", "admin.vm.tag.Remove", "ai-owner-someone-else")
    created = ok(gate_call(stack, "ai-debian", "qmcp.Create", {"name": "ai-fresh"}))
    assert created["tier"] == "exec" and created["netvm"] == "ai-egress"
    for name in (disp["name"], "ai-fresh"):
        tags = set(dom0_admin(stack, name, "admin.vm.tag.List").split())
        scoped = {t for t in tags if t.startswith("ai-")}
        assert scoped == {"ai-managed", "ai-exec", "ai-owner-mcp-control"}, (name, tags)


def test_ledger_c205f3b_tier_changes_never_appear_in_events(stack: Stack) -> None:
    done = threading.Event()

    def operator() -> None:
        threading.Event().wait(0.8)
        stack.admin("tier", "ai-notes", "full")
        stack.admin("tier", "ai-notes", "read")
        done.set()

    threading.Thread(target=operator, daemon=True).start()
    events = ok(gate_call(stack, "@adminvm", "qmcp.Events", {"seconds": 4}))["events"]
    assert done.wait(10)
    text = json.dumps(events)
    assert "ai-full" not in text and "ai-exec" not in text
    assert all(ev["subject"].startswith("ai-") for ev in events), events


@pytest.mark.parametrize("qube", ["@adminvm", "dom0", "sys-usb"])
def test_ledger_g0_2_and_g0_5_no_device_enumeration_outside_the_scope(
    stack: Stack, qube: str
) -> None:
    assert gate_call(stack, qube, "qmcp.DevicesList") == REFUSED


def test_ledger_g0_3_4_device_lists_redact_out_of_scope_endpoints(stack: Stack) -> None:
    ok(gate_call(stack, "ai-build", "qmcp.Start"))
    ok(gate_call(stack, "ai-usb", "qmcp.Start"))
    # the operator attaches a device of an out-of-scope backend to an agent qube
    dom0_admin(stack, "sys-usb", "admin.vm.Start")
    dom0_admin(
        stack,
        "ai-build",
        "admin.vm.device.block.Attach",
        "sys-usb+sda+_",
        b"device_id='*' port_id='sda' devclass='block' backend_domain='sys-usb' "
        b"mode='manual' frontend_domain='ai-build'",
    )
    # … and a USB device of it (the usb class follows the same rule)
    dom0_admin(stack, "ai-build", "admin.vm.device.usb.Attach", "sys-usb+1-1+_", b"")
    attached = ok(gate_call(stack, "ai-build", "qmcp.DevicesList"))["attached"]
    assert attached == [
        {"devclass": "block", "backend": "<out-of-scope>", "port_id": "sda", "mode": "manual"},
        {"devclass": "usb", "backend": "<out-of-scope>", "port_id": "1-1", "mode": "manual"},
    ]
    exposed = ok(gate_call(stack, "ai-usb", "qmcp.DevicesList"))["exposed"]
    assert [(d["devclass"], d["port_id"]) for d in exposed] == [("block", "sdb"), ("usb", "2-1")]
    assert "sys-usb" not in json.dumps([attached, exposed])
    dom0_admin(stack, "ai-build", "admin.vm.device.block.Detach", "sys-usb+sda+_")
    dom0_admin(stack, "ai-build", "admin.vm.device.usb.Detach", "sys-usb+1-1+_")


def test_ledger_g0_6_exec_cannot_push_into_read_qubes(stack: Stack) -> None:
    reply = gate_call(
        stack, "ai-dev", "qmcp.Copy", {"destination": "ai-notes", "paths": ["/etc/hostname"]}
    )
    assert code(reply) == "insufficient-tier"
    result = run_in(stack, "ai-dev", "qvm-copy-to-vm", "ai-notes", "/etc/hostname")
    assert result["exit_code"] != 0


def test_ledger_g0_8_unmatched_filecopy_is_refused_not_asked(stack: Stack) -> None:
    result = run_in(stack, "ai-dev", "qvm-copy-to-vm", "personal", "/etc/hostname")
    assert result["exit_code"] != 0 and "Request refused" in result["stderr"]


def test_ledger_g0e_trailing_newline_names_are_refused(stack: Stack) -> None:
    reply = gate_call(
        stack, "ai-dev", "qmcp.Copy", {"destination": "ai-build\n", "paths": ["/etc/hostname"]}
    )
    assert code(reply) == "invalid-input"


def test_ledger_f_j_offline_sources_stay_offline_when_cloned(stack: Stack) -> None:
    clone = ok(gate_call(stack, "ai-usb", "qmcp.Clone", {"name": "ai-usb2"}))
    assert clone["netvm"] is None


def test_ledger_f1_create_names_outside_the_prefix_are_refused_before_lookup(
    stack: Stack,
) -> None:
    for name in ("vault", "no-such-qube"):
        reply = gate_call(stack, "ai-debian", "qmcp.Create", {"name": name})
        assert reply["error"] == {
            "code": "invalid-input",
            "message": "name must start with 'ai-' (your namespace)",
        }


@pytest.mark.parametrize("size", [1.5, True, "2GiB", -1])
def test_ledger_f5_private_size_must_be_a_positive_integer(stack: Stack, size: object) -> None:
    reply = gate_call(stack, "ai-debian", "qmcp.Create", {"name": "ai-x", "private_size": size})
    assert code(reply) == "invalid-input"


def test_ledger_w2_3c_disconnecting_is_always_allowed(stack: Stack) -> None:
    ok(gate_call(stack, "ai-build2", "qmcp.SetProperty", {"property": "netvm", "value": None}))
    assert ok(gate_call(stack, "ai-build2", "qmcp.Info"))["properties"]["netvm"] is None


def test_ledger_f9_an_unrecordable_request_is_refused_and_not_done(stack: Stack) -> None:
    anchor = stack.root / "var/log/qubes-mcp/audit.log.head"
    saved = anchor.read_bytes()
    anchor.write_bytes(saved.replace(b'"seq"', b'"seq_"'))  # the log no longer verifies
    try:
        reply = gate_call(stack, "ai-web", "qmcp.Start")
        assert code(reply) == "unavailable"
        state = ok(gate_call(stack, "@adminvm", "qmcp.List"))
        assert {q["name"]: q["state"] for q in state["qubes"]}["ai-web"] == "Halted"
    finally:
        anchor.write_bytes(saved)


def test_ledger_installer_never_installs_a_policy_that_breaks_the_directory(
    stack: Stack,
) -> None:
    broken = stack.root / "etc/qubes/policy.d/31-broken.policy"
    ours = stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy"
    before = ours.read_bytes()
    broken.write_text("qubes.Filecopy * @anyvm\n")
    try:
        result = stack.admin("install", "--root", str(stack.root))
        assert result.returncode != 0 and "31-broken.policy:1" in result.stderr
        assert ours.read_bytes() == before
    finally:
        broken.unlink()


# --- our own -------------------------------------------------------------------------------------


def test_own_sandbox_qubes_cannot_call_the_gate(stack: Stack) -> None:
    result = run_in(stack, "ai-dev", "qrexec-client-vm", "@adminvm", "qmcp.List")
    assert result["exit_code"] == 126


def test_own_hostile_bytes_at_the_gate_socket_get_one_json_refusal(stack: Stack) -> None:
    sock_path = str(stack.root / "run/qubes-mcp/gate.sock")
    for raw in (
        b"",
        b"\0\0\0",
        b"qmcp.List+ mcp-control keyword adminvm",
        b"x" * 5000,
        b"qmcp.List+ mcp-control weird adminvm\0{}",
        os.urandom(2000),
        b"qmcp.Run+ mcp-control name ai-dev\0" + os.urandom(300),
    ):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(sock_path)
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            data = b"".join(iter(lambda s=s: s.recv(65536), b""))
        reply = json.loads(data)
        assert reply["ok"] is False and reply["error"]["code"] in CODES
    assert ok(gate_call(stack, "@adminvm", "qmcp.List"))["qubes"]


def test_own_an_approval_with_the_wrong_digest_is_not_an_approval(stack: Stack) -> None:
    def operator() -> None:
        for _ in range(300):
            pending = json.loads(stack.admin("pending", "--json").stdout or "[]")
            if pending:
                forged = stack.admin("approve", pending[0]["id"], "--digest", "0" * 16)
                assert forged.stdout.strip() == "mismatch"
                stack.admin("deny", pending[0]["id"])
                return
            threading.Event().wait(0.1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    assert code(gate_call(stack, "ai-usb2", "qmcp.Remove")) == "consent-denied"
    thread.join(10)


def test_own_the_audit_chain_verifies_after_the_attacks(stack: Stack) -> None:
    result = stack.admin("audit", "verify")
    assert result.returncode == 0, result.stdout


def test_own_the_consent_display_cannot_drive_the_operators_terminal(stack: Stack) -> None:
    """On a guarded qube every change waits for the operator, and the description carries
    agent-chosen words; escapes in them must reach the terminal as text."""
    dom0_admin(stack, "ai-build", "admin.vm.tag.Set", "ai-guarded")
    seen: list[dict[str, Any]] = []

    def operator() -> None:
        for _ in range(300):
            pending = json.loads(stack.admin("pending", "--json").stdout or "[]")
            if pending:
                seen.extend(pending)
                shown = stack.admin("pending").stdout
                seen.append({"printed": shown})
                stack.admin("deny", pending[0]["id"])
                return
            threading.Event().wait(0.1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    try:
        reply = gate_call(
            stack, "ai-build", "qmcp.Run", {"command": ["echo", "\x1b]0;owned\x07\x1b[2J", "\rOK"]}
        )
    finally:
        thread.join(10)
        dom0_admin(stack, "ai-build", "admin.vm.tag.Remove", "ai-guarded")
    assert code(reply) == "consent-denied"
    assert seen and "\x1b" not in seen[0]["description"]
    assert "\x1b" not in seen[-1]["printed"] and "\r" not in seen[-1]["printed"]
    assert "ai-build is guarded" in " ".join(seen[0]["reasons"])


def test_own_one_principal_flooding_the_consent_queue_cannot_starve_another(
    tmp_path: Path,
) -> None:
    second = '\n[[principal]]\nqube = "work"\nscope = "ai"\nceiling = "read"\nname_prefix = "wk-"\n'
    s = start_stack(
        tmp_path / "root",
        config_edit=lambda t: t.replace("[budget]", second + "\n[budget]", 1).replace(
            "[consent]\ntimeout = 120", "[consent]\ntimeout = 30"
        ),
    )
    try:
        import concurrent.futures

        # more consent-waiting requests than one principal's concurrency limit (16)
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            waiting = [pool.submit(gate_call, s, "ai-build", "qmcp.Remove") for _ in range(20)]
            threading.Event().wait(2)
            started = time.monotonic()
            listing = gate_call(s, "@adminvm", "qmcp.List", source="work")
            # served at once, not after the flood's 30 s consent timeouts free a slot
            assert time.monotonic() - started < 10
            assert listing["ok"] is True, listing
            assert {q["tier"] for q in listing["result"]["qubes"]} == {"read"}
            for item in json.loads(s.admin("pending", "--json").stdout or "[]"):
                s.admin("deny", item["id"])
            for _ in range(10):  # the ones that were queued behind the limit
                threading.Event().wait(0.5)
                for item in json.loads(s.admin("pending", "--json").stdout or "[]"):
                    s.admin("deny", item["id"])
            codes = {f.result(timeout=60)["error"]["code"] for f in waiting}
        assert codes == {"consent-denied"}
    finally:
        s.stop()
