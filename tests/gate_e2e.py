"""Helpers for end-to-end gate tests: a running stack and JSON calls through qrexec."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.stack import Stack


def gate_call(
    stack: Stack,
    target: str,
    service: str,
    payload: dict[str, Any] | None = None,
    *,
    source: str = "mcp-control",
) -> dict[str, Any]:
    """One ``qmcp.*`` call as the principal; a qrexec refusal becomes ``{"refused": 126}``."""
    raw = b"" if payload is None else json.dumps(payload).encode()
    result = stack.call(target, service, raw, source=source)
    if result.returncode == 126:
        assert result.stderr == b"Request refused\n"
        return {"refused": 126}
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def answer_when_pending(
    stack: Stack, answer: str, *, op: str | None = None, timeout: float = 60
) -> threading.Thread:
    """A scripted operator: waits for one pending request and approves or denies it."""

    def operator() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = stack.admin("pending", "--json")
            for item in json.loads(listed.stdout or "[]"):
                if op is None or item["op"] == op:
                    stack.admin(answer, item["id"])
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=operator, daemon=True)
    thread.start()
    return thread


def audit_lines(stack: Stack) -> list[dict[str, Any]]:
    log = stack.root / "var/log/qubes-mcp/audit.log"
    return [json.loads(line) for line in Path(log).read_text().splitlines()]


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    """The result of an allowed call (fails the test with the reply otherwise)."""
    assert reply.get("ok") is True, reply
    result: dict[str, Any] = reply["result"]
    return result


def code(reply: dict[str, Any]) -> str:
    """The error code of a refused call (fails the test with the reply otherwise)."""
    assert reply.get("ok") is False, reply
    return str(reply["error"]["code"])


def dom0_admin(stack: Stack, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
    """What the operator does in dom0 (qvm-* tools): straight to qubesd, no gate."""
    return asyncio.run(AdminClient(stack.paths.qubesd_sock).call(dest, method, arg, payload))
