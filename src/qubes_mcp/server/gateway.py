"""One tool call → one gate call, with progress, cancellation and the error contract.

Every tool body ends in :meth:`Gateway.call`. It sends the payload through the transport,
tells the client what it is waiting for (a command, an event window, the operator's approval in
dom0), kills the transport when the MCP call is cancelled, and turns the gate's refusal into
``ToolError("<code>: <message>")``. Anything else that goes wrong is left to FastMCP's
``mask_error_details``, so no exception text reaches the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from fastmcp import Context
from fastmcp.exceptions import ToolError

from qubes_mcp.server.table import ADMINVM, OpSpec, Table, load_table
from qubes_mcp.server.transport import GateRefusalError, Timeouts, Transport, invoke

#: seconds between progress notifications while a long call waits on dom0
HEARTBEAT = 5.0


def _waiting_message(op: OpSpec) -> str:
    if op.consent:
        return "waiting for the operator to approve in dom0"
    if not op.read_only:
        return "waiting for dom0 (the operator may have to approve this in dom0)"
    return "waiting for dom0"


@dataclass
class Gateway:
    """The server's only way to dom0."""

    transport: Transport
    timeouts: Timeouts = field(default_factory=Timeouts)
    table: Table = field(default_factory=load_table)
    #: whether dom0 has told us its consent window yet (qube.list reports it)
    _consent_learned: bool = False

    async def _learn_consent_window(self) -> None:
        """Ask dom0 once how long it waits for the operator, so that a call which may wait
        for consent never gives up before dom0 has answered (the flag is only a floor)."""
        self._consent_learned = True
        try:
            listing = await invoke(
                self.transport, self.table.op("qube.list"), ADMINVM, {}, self.timeouts
            )
        except GateRefusalError:
            return
        reported = listing.get("consent_timeout")
        if isinstance(reported, int) and not isinstance(reported, bool):
            self.timeouts = dataclasses.replace(
                self.timeouts, consent=max(self.timeouts.consent, float(reported))
            )

    async def call(
        self,
        ctx: Context | None,
        op_name: str,
        target: str = ADMINVM,
        payload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call ``op_name`` on ``target``; return the gate's result.

        Raises:
            ToolError: the gate refused (``"<code>: <message>"``).
        """
        op = self.table.op(op_name)
        body = payload or {}
        if op.is_global:
            target = ADMINVM

        async def run_call() -> dict[str, Any]:
            if not op.read_only and not self._consent_learned:
                await self._learn_consent_window()
            return await invoke(self.transport, op, target, body, self.timeouts)

        work = asyncio.ensure_future(run_call())
        try:
            if ctx is not None and (op.long_running or not op.read_only):
                await self._report_while_waiting(ctx, op, work)
            return await work
        except GateRefusalError as refusal:
            raise ToolError(f"{refusal.code}: {refusal.message}") from None
        finally:
            # cancellation of the MCP call lands here: stop the qrexec call with it
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, GateRefusalError):
                    await work

    async def _report_while_waiting(
        self, ctx: Context, op: OpSpec, work: asyncio.Future[dict[str, Any]]
    ) -> None:
        message = _waiting_message(op)
        # progress notifications carry the message; MCP's logging capability (ctx.info) is
        # deprecated (SEP-2577), so nothing is sent through it
        started = time.monotonic()
        await ctx.report_progress(0, None, message)
        while not work.done():
            await asyncio.wait({work}, timeout=HEARTBEAT)
            if not work.done():
                elapsed = time.monotonic() - started
                await ctx.report_progress(elapsed, None, f"{message} ({elapsed:.0f} s)")
