"""Through the MCP protocol (FastMCP's in-memory client): refusals, masking, progress.

The transports here are small in-process fakes standing in for dom0; the qrexec process
behaviour itself is tested in test_server_transport.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError

from qubes_mcp.server.app import CAPABILITIES_URI, build_server


class ScriptedDom0:
    """Answers every call with ``reply`` (bytes) or raises ``error``; can hold calls open."""

    def __init__(self, reply: bytes = b"", error: BaseException | None = None) -> None:
        self.reply = reply
        self.error = error
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.release: asyncio.Event | None = None

    async def call(self, target: str, service: str, payload: bytes, timeout: float) -> bytes:
        self.calls.append((target, service, json.loads(payload)))
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.reply


def ok(result: dict[str, Any]) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode()


def refused(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "error": {"code": code, "message": message}}).encode()


LISTING = {
    "principal": "mcp-control",
    "ceiling": "full",
    "name_prefix": "ai-",
    "may_create": True,
    "qubes": [{"name": "ai-dev", "class": "AppVM", "state": "Halted", "tier": "exec"}],
}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_refusal_is_a_tool_error_with_code_and_message() -> None:
    dom0 = ScriptedDom0(refused("insufficient-tier", "needs exec on ai-notes"))

    async def go() -> None:
        async with Client(build_server(dom0)) as c:
            with pytest.raises(ToolError, match=r"^insufficient-tier: needs exec on ai-notes$"):
                await c.call_tool("qube_run", {"qube": "ai-notes", "command": ["id"]})

    run(go())
    # first, once, the server asks dom0 how long it waits for the operator (qube.list)
    assert dom0.calls == [
        ("@adminvm", "qmcp.List", {}),
        ("ai-notes", "qmcp.Run", {"command": ["id"], "stdin": "", "timeout": 60}),
    ]


@pytest.mark.parametrize(
    "error",
    [RuntimeError("/var/run/secret path"), KeyError("vault"), OSError(13, "vault denied")],
    ids=["runtime-error", "key-error", "os-error"],
)
def test_unexpected_errors_are_masked(error: BaseException) -> None:
    dom0 = ScriptedDom0(error=error)

    async def go() -> str:
        async with Client(build_server(dom0)) as c:
            result = await c.call_tool("qube_info", {"qube": "ai-dev"}, raise_on_error=False)
            assert result.is_error
            return " ".join(getattr(part, "text", "") for part in result.content)

    text = run(go())
    assert "secret" not in text and "vault" not in text


@pytest.mark.parametrize(
    "args",
    [
        {"qube": "dom0\n"},
        {"qube": "-h"},
        {"qube": "ai-dev", "extra": 1},
        {},
    ],
    ids=["newline-in-name", "option-as-name", "unknown-argument", "missing-qube"],
)
def test_malformed_arguments_never_reach_dom0(args: dict[str, Any]) -> None:
    dom0 = ScriptedDom0(ok({}))

    async def go() -> None:
        async with Client(build_server(dom0)) as c:
            result = await c.call_tool("qube_info", args, raise_on_error=False)
            assert result.is_error

    run(go())
    assert dom0.calls == []


def test_a_consent_operation_says_it_waits_for_the_operator() -> None:
    dom0 = ScriptedDom0(ok({"qube": "ai-build", "removed": True}))
    dom0.release = asyncio.Event()
    messages: list[str] = []

    async def go() -> dict[str, Any]:
        assert dom0.release is not None
        release = dom0.release

        async def progress(done: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")
            release.set()  # answer only once the client has been told what it waits for

        async with Client(build_server(dom0)) as c:
            result = await c.call_tool(
                "qube_remove", {"qube": "ai-build"}, progress_handler=progress
            )
            return result.structured_content or {}

    assert run(go()) == {"qube": "ai-build", "removed": True}
    assert messages[0] == "waiting for the operator to approve in dom0"


def test_capabilities_tool_and_resource_report_what_dom0_reports() -> None:
    dom0 = ScriptedDom0(ok(LISTING))

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Client(build_server(dom0, read_only=True)) as c:
            tool = await c.call_tool("capabilities_get", {})
            contents = await c.read_resource(CAPABILITIES_URI)
            return tool.structured_content or {}, json.loads(getattr(contents[0], "text", ""))

    tool, resource = run(go())
    assert tool == resource
    assert tool["qubes"] == LISTING["qubes"]
    assert tool["tools"]["qube_info"] == "read" and "qube_run" not in tool["tools"]
    assert all(call[:2] == ("@adminvm", "qmcp.List") for call in dom0.calls)


def test_capabilities_resource_relays_a_refusal() -> None:
    dom0 = ScriptedDom0(refused("unavailable", "qubes-mcp gate is unavailable"))

    async def go() -> None:
        async with Client(build_server(dom0)) as c:
            with pytest.raises(Exception, match="unavailable: qubes-mcp gate is unavailable"):
                await c.read_resource(CAPABILITIES_URI)

    run(go())


class HoldForever:
    """A dom0 that never answers; records whether the server cancelled its call."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def call(self, target: str, service: str, payload: bytes, timeout: float) -> bytes:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b""  # pragma: no cover - never reached


def test_cancelling_the_mcp_call_cancels_the_dom0_call() -> None:
    dom0 = HoldForever()

    async def go() -> None:
        async with Client(build_server(dom0)) as c:
            call = asyncio.create_task(c.call_tool("qube_start", {"qube": "ai-dev"}))
            await asyncio.wait_for(dom0.started.wait(), 10)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await asyncio.wait_for(dom0.cancelled.wait(), 10)

    run(go())
    assert dom0.cancelled.is_set()


def test_an_emulator_that_is_not_running_is_unavailable(tmp_path: Any) -> None:
    # a transport that reaches nothing names no qube: unavailable, for a qube and for dom0
    from qubes_mcp.server.transport import SimTransport

    async def go() -> None:
        async with Client(build_server(SimTransport(tmp_path))) as c:
            with pytest.raises(ToolError, match=r"^unavailable: dom0 cannot be reached"):
                await c.call_tool("qube_list", {})
            with pytest.raises(ToolError, match=r"^unavailable: dom0 cannot be reached"):
                await c.call_tool("qube_info", {"qube": "ai-dev"})

    run(go())
