"""Attacks on lab links (issue 10 §3, decision record 0018), on the emulator with the real gate.

A link is the only path from one sandbox qube to another, so: it names two qubes of the
caller's scope, both at net tier; a hidden or missing qube gets the refusal a missing one
gets, byte for byte; the operator approves every opening; no policy line exists without that
approval, and none outlives the link or either of its qubes; every opening and closing is in
the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.enrolment_helpers import enrol, unenrol
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok
from tests.waiting import until

pytestmark = pytest.mark.bwrap

POLICY = "etc/qubes/policy.d/25-qubes-mcp.policy"
NOT_FOUND = {"ok": False, "error": {"code": "not-found", "message": "no such qube, or not yours"}}
REFUSED = {"refused": 126}
#: every qube of the demo fleet the principal cannot link to (not a member of its scope)
HIDDEN = [
    "personal",
    "work",
    "vault",
    "sys-net",
    "sys-firewall",
    "sys-usb",
    "default-dvm",
    "debian-13-xfce",
    "mcp-control",
    "dom0",
    "ai-dump",  # a dump sink takes copies, nothing else
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("links") / "root")
    try:
        yield s
    finally:
        s.stop()


def link_lines(stack: Stack) -> list[list[str]]:
    text = (stack.root / POLICY).read_text()
    return [ln.split() for ln in text.splitlines() if ln.startswith("qubes.ConnectTCP")]


def pending(stack: Stack) -> list[dict[str, Any]]:
    return list(json.loads(stack.admin("pending", "--json").stdout or "[]"))


def link_open(stack: Stack, client: str, server: object, port: object) -> dict[str, Any]:
    return gate_call(stack, client, "qmcp.LinkOpen", {"server": server, "port": port})


def link_close(stack: Stack, client: str, server: object, port: object) -> dict[str, Any]:
    return gate_call(stack, client, "qmcp.LinkClose", {"server": server, "port": port})


def approved_open(stack: Stack, client: str, server: str, port: int) -> dict[str, Any]:
    operator = answer_when_pending(stack, "approve", op="link.open")
    result = ok(link_open(stack, client, server, port))
    operator.join(timeout=60)
    return result


# --- scope: a hidden qube is a missing qube ------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN)
def test_a_hidden_server_gets_the_bytes_of_a_missing_one(stack: Stack, hidden: str) -> None:
    for call in (link_open, link_close):
        got = call(stack, "ai-web", hidden, 8080)
        assert got == call(stack, "ai-web", "no-such-qube", 8080) == NOT_FOUND, call
    assert pending(stack) == [] and link_lines(stack) == []


@pytest.mark.parametrize("hidden", HIDDEN)
def test_a_hidden_client_gets_the_bytes_of_a_missing_one(stack: Stack, hidden: str) -> None:
    for service in ("qmcp.LinkOpen", "qmcp.LinkClose"):
        payload = json.dumps({"server": "ai-build", "port": 8080}).encode()
        got = stack.call(hidden, service, payload)
        missing = stack.call("no-such-qube", service, payload)
        assert (got.returncode, got.stdout, got.stderr) == (
            missing.returncode,
            missing.stdout,
            missing.stderr,
        )
        assert got.returncode == 126  # qrexec refuses it before the gate sees it
    assert link_lines(stack) == []


# --- tier: net on both qubes to open -----------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "server"),
    [
        ("ai-dev", "ai-build"),  # exec client
        ("ai-web", "ai-dev"),  # exec server
        ("ai-notes", "ai-build"),  # read client
        ("ai-web", "ai-notes"),  # read server
        ("ai-web", "ai-egress"),  # read server (the egress qube)
    ],
)
def test_open_needs_net_on_both_qubes(stack: Stack, client: str, server: str) -> None:
    assert code(link_open(stack, client, server, 8080)) == "insufficient-tier"
    assert pending(stack) == [] and link_lines(stack) == []


def test_close_needs_exec_on_the_client(stack: Stack) -> None:
    assert code(link_close(stack, "ai-notes", "ai-build", 8080)) == "insufficient-tier"
    assert code(link_close(stack, "ai-web", "ai-notes", 8080)) == "invalid-state"  # no such link


# --- input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, 65536, -1, "8080", 80.5, True, None, [80]])
def test_a_port_is_an_integer_1_to_65535(stack: Stack, port: object) -> None:
    assert code(link_open(stack, "ai-web", "ai-build", port)) == "invalid-input"
    assert pending(stack) == [] and link_lines(stack) == []


def test_client_and_server_must_differ(stack: Stack) -> None:
    assert code(link_open(stack, "ai-web", "ai-web", 8080)) == "invalid-input"
    assert pending(stack) == [] and link_lines(stack) == []


@pytest.mark.parametrize("server", ["@anyvm", "@default", "@tag:ai-managed", "*", "ai-*", ""])
def test_no_keyword_tag_or_wildcard_can_be_a_server(stack: Stack, server: str) -> None:
    assert code(link_open(stack, "ai-web", server, 8080)) == "invalid-input"
    assert link_lines(stack) == []


@pytest.mark.parametrize(
    "server", ["@dispvm:ai-dvm", "@dispvm", "@adminvm", "dom0", "@type:AppVM", "AI-BUILD", "uuid"]
)
def test_no_other_target_form_can_be_a_server(stack: Stack, server: str) -> None:
    """Every other way qrexec can name a target: refused before the operator is asked,
    with no line written (a name in another case is another, missing, name)."""
    if server == "uuid":  # ai-build's own uuid instead of its name
        server = _uuid_of(stack, "ai-build")
    assert code(link_open(stack, "ai-web", server, 8080)) in ("invalid-input", "not-found")
    assert pending(stack) == [] and link_lines(stack) == []


# --- consent and policy --------------------------------------------------------------------------


def test_open_asks_the_operator_and_a_denial_writes_no_line(stack: Stack) -> None:
    operator = answer_when_pending(stack, "deny", op="link.open")
    reply = link_open(stack, "ai-web", "ai-build", 8080)
    operator.join(timeout=60)
    assert code(reply) == "consent-denied"
    assert link_lines(stack) == []
    last = [r for r in audit_lines(stack) if r["op"] == "link.open"][-1]
    assert (last["outcome"], last["code"]) == ("not-run", "consent-denied")
    assert ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"] == []


def _uuid_of(stack: Stack, name: str) -> str:
    line = dom0_admin(stack, name, "admin.vm.List").split()
    return "uuid:" + next(w for w in line if w.startswith("uuid=")).removeprefix("uuid=")


def test_a_linked_client_still_reaches_nothing_else(stack: Stack) -> None:
    link = approved_open(stack, "ai-web", "ai-build", 8080)["link"]
    try:
        assert link_lines(stack) == [["qubes.ConnectTCP", "+8080", "ai-web", "ai-build", "allow"]]
        for target, service in [
            ("ai-build", "qubes.ConnectTCP+8081"),
            ("ai-build", "qubes.VMShell"),
            ("ai-usb", "qubes.ConnectTCP+8080"),
            ("personal", "qubes.ConnectTCP+8080"),
            ("@default", "qubes.ConnectTCP+8080"),
            ("@dispvm", "qubes.ConnectTCP+8080"),
            ("@dispvm:ai-dvm", "qubes.ConnectTCP+8080"),
            ("@type:AppVM", "qubes.ConnectTCP+8080"),
            ("@adminvm", "qubes.ConnectTCP+8080"),
            (_uuid_of(stack, "personal"), "qubes.ConnectTCP+8080"),
            ("AI-BUILD", "qubes.ConnectTCP+8080"),
        ]:
            got = ok(
                gate_call(
                    stack, "ai-web", "qmcp.Run", {"command": ["qrexec-client-vm", target, service]}
                )
            )
            assert got["exit_code"] == 126, (target, service)
        # the other way round is no link either
        got = ok(
            gate_call(
                stack,
                "ai-build",
                "qmcp.Run",
                {"command": ["qrexec-client-vm", "ai-web", "qubes.ConnectTCP+8080"]},
            )
        )
        assert got["exit_code"] == 126
        # one client port leads to one server
        assert code(link_open(stack, "ai-web", "ai-usb", 8080)) == "conflict"
    finally:
        ok(link_close(stack, "ai-web", "ai-build", 8080))
    assert link_lines(stack) == []
    ops = [
        (r["op"], r["outcome"], r["detail"].get("link_id"), r["detail"].get("port"))
        for r in audit_lines(stack)
        if r["op"] in ("link.open", "link.close") and r["outcome"] == "ok"
    ]
    assert ops[-2:] == [
        ("link.open", "ok", link["id"], 8080),
        ("link.close", "ok", link["id"], 8080),
    ]


def test_another_principal_cannot_see_or_close_a_link(stack: Stack) -> None:
    """The lists are the caller's only: what a read-only auditor in the same scope sees."""
    link = approved_open(stack, "ai-web", "ai-build", 9000)["link"]
    try:
        listed = ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"]
        assert [k["id"] for k in listed] == [link["id"]]
    finally:
        ok(link_close(stack, "ai-web", "ai-build", 9000))
    assert code(link_close(stack, "ai-web", "ai-build", 9000)) == "invalid-state"


# --- removal of either qube closes the link (run last: they remove qubes) ---------------------


def _closings(stack: Stack, link_id: str) -> int:
    """How many audit lines record that the link closed. A removal through the gate records
    it in the removal's detail (``links_closed``), unless the gate's domain-delete watcher
    got there first: then in its own ``link.close`` line. Exactly one of the two."""
    count = 0
    for r in audit_lines(stack):
        if r["op"] == "qube.remove" and link_id in r["detail"].get("links_closed", []):
            count += 1
        if r["op"] == "link.close" and r["detail"].get("link_id") == link_id:
            count += r["outcome"] == "ok"
    return count


def test_removing_the_server_through_the_gate_closes_the_link(stack: Stack) -> None:
    link = approved_open(stack, "ai-build", "ai-usb", 7000)["link"]
    assert link_lines(stack) == [["qubes.ConnectTCP", "+7000", "ai-build", "ai-usb", "allow"]]
    operator = answer_when_pending(stack, "approve", op="qube.remove")
    ok(gate_call(stack, "ai-usb", "qmcp.Remove", {}))
    operator.join(timeout=60)
    assert link_lines(stack) == []
    assert _closings(stack, link["id"]) == 1
    assert ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"] == []


def test_the_operator_removing_the_client_closes_the_link(stack: Stack) -> None:
    link = approved_open(stack, "ai-web", "ai-build", 7001)["link"]
    assert link_lines(stack) == [["qubes.ConnectTCP", "+7001", "ai-web", "ai-build", "allow"]]
    dom0_admin(stack, "ai-web", "admin.vm.Kill")
    dom0_admin(stack, "ai-web", "admin.vm.Remove")  # qvm-remove in dom0: no gate request
    # the gate's domain-delete watcher
    until(lambda: not link_lines(stack), why="the link outlived its client")
    closing = [r for r in audit_lines(stack) if r["op"] == "link.close"][-1]
    assert closing["detail"]["link_id"] == link["id"]
    assert closing["detail"]["reason"] == "qube removed"
    assert closing["principal"] == "mcp-control"
    assert _closings(stack, link["id"]) == 1


def test_the_operator_unenrolling_the_server_closes_the_link(stack: Stack) -> None:
    assert "enrolled in ai" in enrol(stack, "work", "--tier", "net")
    link = approved_open(stack, "ai-build", "work", 7002)["link"]
    assert link_lines(stack) == [["qubes.ConnectTCP", "+7002", "ai-build", "work", "allow"]]
    assert f"lab link {link['id']} closed" in unenrol(stack, "work")
    assert link_lines(stack) == []
    assert ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"] == []


def test_the_operator_lowering_an_end_below_net_closes_the_link(stack: Stack) -> None:
    """link.open needs net on both ends; an operator who takes net away takes the link too
    (same commit), and giving net back does not bring it back."""
    assert "enrolled in ai" in enrol(stack, "work", "--tier", "net")
    link = approved_open(stack, "ai-build", "work", 7003)["link"]
    assert link_lines(stack) == [["qubes.ConnectTCP", "+7003", "ai-build", "work", "allow"]]
    assert "closed" not in enrol(stack, "work", "--tier", "full")  # above net: kept
    assert link_lines(stack) != []
    assert f"lab link {link['id']} closed" in enrol(stack, "work", "--tier", "exec")
    assert link_lines(stack) == []
    enrol(stack, "work", "--tier", "net")
    assert link_lines(stack) == []
    assert ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"] == []
    unenrol(stack, "work")


def test_a_tier_tag_removed_by_hand_closes_the_link(stack: Stack) -> None:
    """qvm-tags in dom0, no qubes-mcp-admin: the gate sees the tag event and re-checks."""
    assert "enrolled in ai" in enrol(stack, "work", "--tier", "net")
    link = approved_open(stack, "ai-build", "work", 7004)["link"]
    assert link_lines(stack) != []
    dom0_admin(stack, "work", "admin.vm.tag.Remove", "ai-net")  # now the default tier: read
    until(lambda: not link_lines(stack), why="the link outlived its end's net tier")
    closing = [r for r in audit_lines(stack) if r["op"] == "link.close"][-1]
    assert closing["detail"] == {"link_id": link["id"], "port": 7004, "reason": "tier below net"}
    unenrol(stack, "work")


def test_a_reload_that_lowers_the_ceiling_closes_the_link(stack: Stack) -> None:
    assert "enrolled in ai" in enrol(stack, "work", "--tier", "net")
    link = approved_open(stack, "ai-build", "work", 7005)["link"]
    saved = stack.config.read_text()
    assert 'ceiling = "full"' in saved
    try:
        stack.config.write_text(saved.replace('ceiling = "full"', 'ceiling = "exec"', 1))
        assert stack.admin("reload").returncode == 0
        assert link_lines(stack) == []  # closed before reload answered
        closing = [r for r in audit_lines(stack) if r["op"] == "link.close"][-1]
        assert closing["detail"]["link_id"] == link["id"]
        assert closing["detail"]["reason"] == "tier below net after a reload"
    finally:
        stack.config.write_text(saved)
        assert stack.admin("reload").returncode == 0
        unenrol(stack, "work")


def test_no_link_file_entry_survives_in_the_registry(stack: Stack) -> None:
    state = Path(stack.root) / "var/lib/qubes-mcp"
    registry = json.loads((state / "enrolment.json").read_text())
    assert registry.get("links", []) == []


# --- the reconcile at the gate's start --------------------------------------------------------


def test_a_link_whose_qube_went_while_the_gate_was_down_closes_at_start(tmp_path: Path) -> None:
    """The operator removed the server while no gate ran: the first request reconciles the
    registry, the link and its line go in that commit, and a link.close line records it."""
    import asyncio

    from qubes_mcp.dom0.admin import AdminClient
    from qubes_mcp.dom0.audit.log import AuditLog
    from qubes_mcp.dom0.consent import ConsentBroker
    from qubes_mcp.dom0.enrolment import Registry, commit, new_link, registry_path
    from qubes_mcp.dom0.gate import Gate, Request
    from qubes_mcp.dom0.render import POLICY_NAME, render_policy
    from tests.enrolment_helpers import in_process_config
    from tests.qubesd_fixtures import Qubesd, demo_app

    qubesd = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        config = in_process_config(qubesd.paths.qubesd_sock, tmp_path)
        state, policy = config.paths.state_dir, config.paths.policy_dir
        link = new_link("ai", "ai-web", "ai-build", 8080, by="gate:mcp-control")
        commit(state, policy, lambda r: r.linked(link), lambda r: render_policy(config, r))
        assert "qubes.ConnectTCP" in (policy / POLICY_NAME).read_text()
        admin = AdminClient(qubesd.paths.qubesd_sock)
        asyncio.run(admin.call("ai-build", "admin.vm.Remove"))
        log_path = tmp_path / "audit" / "audit.log"
        gate = Gate(config, AuditLog(log_path), ConsentBroker(5), admin)
        asyncio.run(gate.handle(Request("qmcp.List", "mcp-control", None, b"")))
    finally:
        qubesd.stop()
    assert "qubes.ConnectTCP" not in (policy / POLICY_NAME).read_text()
    assert Registry.load(registry_path(state)).links() == ()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    closing = [r for r in records if r["op"] == "link.close"]
    assert [(r["principal"], r["detail"]["link_id"], r["detail"]["reason"]) for r in closing] == [
        ("mcp-control", link.id, "qube removed")
    ]
