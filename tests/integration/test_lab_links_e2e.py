"""A lab link through the whole stack (issue 10 §3): an HTTP server in one qube, a fetch from
another through ``qubes.ConnectTCP``, and nothing once the link is closed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, gate_call, ok

pytestmark = pytest.mark.bwrap

POLICY = "etc/qubes/policy.d/25-qubes-mcp.policy"
PORT = 8080
LINE = f"qubes.ConnectTCP +{PORT}"


def run(stack: Stack, qube: str, *argv: str, timeout: int = 30) -> dict[str, Any]:
    return ok(gate_call(stack, qube, "qmcp.Run", {"command": list(argv), "timeout": timeout}))


def fetch(stack: Stack, qube: str) -> dict[str, Any]:
    return run(stack, qube, "curl", "-sS", "--max-time", "5", f"http://localhost:{PORT}/")


def serve(stack: Stack, qube: str, text: str) -> None:
    """``python3 -m http.server`` on 127.0.0.1:PORT in ``qube``, left running (nohup)."""
    script = (
        f"mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && "
        f"nohup python3 -m http.server {PORT} --bind 127.0.0.1 --directory /tmp/www "
        ">/dev/null 2>&1 &"
    )
    run(stack, qube, "sh", "-c", script)
    deadline = time.monotonic() + 20
    while run(stack, qube, "curl", "-sS", f"http://127.0.0.1:{PORT}/")["exit_code"] != 0:
        assert time.monotonic() < deadline, "the HTTP server did not start"
        time.sleep(0.3)


def test_fetch_through_a_link_then_not_after_close(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "root")
    policy = stack.root / POLICY
    try:
        serve(stack, "ai-build", "lab-ok")
        # no link: nothing listens in the client, and qrexec refuses the call itself
        assert fetch(stack, "ai-web")["exit_code"] != 0
        direct = run(stack, "ai-web", "qrexec-client-vm", "ai-build", f"qubes.ConnectTCP+{PORT}")
        assert direct["exit_code"] == 126
        assert LINE not in policy.read_text()

        operator = answer_when_pending(stack, "approve", op="link.open")
        opened = ok(
            gate_call(stack, "ai-web", "qmcp.LinkOpen", {"server": "ai-build", "port": PORT})
        )
        operator.join(timeout=60)
        link = opened["link"]
        assert (link["client"], link["server"], link["port"]) == ("ai-web", "ai-build", PORT)
        lines = [ln for ln in policy.read_text().splitlines() if ln.startswith("qubes.ConnectTCP")]
        assert [ln.split() for ln in lines] == [
            ["qubes.ConnectTCP", f"+{PORT}", "ai-web", "ai-build", "allow"]
        ]

        got = fetch(stack, "ai-web")
        assert (got["exit_code"], got["stdout"]) == (0, "lab-ok\n"), got
        # the link goes one way: the server's localhost:PORT is its own server, not the client
        assert (
            run(stack, "ai-build", "qrexec-client-vm", "ai-web", "qubes.ConnectTCP+22")["exit_code"]
            == 126
        )

        listed = ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"]
        assert [(k["id"], k["client"], k["server"], k["port"]) for k in listed] == [
            (link["id"], "ai-web", "ai-build", PORT)
        ]

        # opening again keeps the id and rebinds the listener (no second listener, no conflict)
        operator = answer_when_pending(stack, "approve", op="link.open")
        again = ok(
            gate_call(stack, "ai-web", "qmcp.LinkOpen", {"server": "ai-build", "port": PORT})
        )
        operator.join(timeout=60)
        assert again["link"]["id"] == link["id"]
        assert fetch(stack, "ai-web")["stdout"] == "lab-ok\n"

        closed = ok(
            gate_call(stack, "ai-web", "qmcp.LinkClose", {"server": "ai-build", "port": PORT})
        )
        assert closed["closed"]["id"] == link["id"] and closed["listener_stopped"] is True
        assert LINE not in policy.read_text()
        assert fetch(stack, "ai-web")["exit_code"] != 0
        # even a listener started by hand in the client meets qrexec's refusal now
        direct = run(stack, "ai-web", "qrexec-client-vm", "ai-build", f"qubes.ConnectTCP+{PORT}")
        assert direct["exit_code"] == 126
        assert ok(gate_call(stack, "dom0", "qmcp.LinkList"))["links"] == []

        records = [r for r in audit_lines(stack) if r["op"] in ("link.open", "link.close")]
        done = [(r["op"], r["detail"].get("link_id")) for r in records if r["outcome"] == "ok"]
        assert done == [
            ("link.open", link["id"]),
            ("link.open", link["id"]),
            ("link.close", link["id"]),
        ]
        assert all(r["detail"]["port"] == PORT for r in records if r["outcome"] == "ok")
    finally:
        stack.stop()
