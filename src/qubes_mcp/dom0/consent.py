"""Consent: a request that needs the operator waits here until they answer, or time runs out.

The operator sees each pending request in dom0 (``qubes-mcp-admin pending``, or a desktop
dialog) described by ``describe.py``: the whole request if it fits the view, otherwise a summary
that names each hidden part with its size and SHA-256, and ``qubes-mcp-admin show ID`` prints
the whole request. The operator answers with ``approve ID`` or ``deny ID``. An answer is bound
to the exact request: approving sends back the digest of the whole request (every argument, not
the text shown), and a digest that does not match (the request changed, or an ID was guessed) is
not an approval.

Every wait ends in one of four ways, each its own refusal code: approved; denied
(``consent-denied``); no answer within the timeout (``consent-timeout``; the gate answers the
agent before its MCP call gives up); or withdrawn (``withdrawn``): the caller hung up — it
cancelled, or its qrexec connection closed — so the request leaves the queue and is never acted
on. The broker remembers the outcome of recent requests, so a late ``approve`` is told
``withdrawn`` or ``timed-out`` rather than acting.

Only dom0 reaches the operator socket (mode 0600 in a 0700 directory); nothing an agent can
call can answer, list or even see the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
import time
from asyncio import FIRST_COMPLETED
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qubes_mcp.dom0.describe import Description, View, escape
from qubes_mcp.dom0.errors import ConsentDeniedError, ConsentTimeoutError, ConsentWithdrawnError


@dataclass
class PendingRequest:
    """One request waiting for the operator. Every text field is already safe to show."""

    id: str
    digest: str
    principal: str
    op: str
    target: str
    #: what the consent view shows (the whole request, or a summary naming what it hides)
    view: View
    #: the whole request, escaped (``qubes-mcp-admin show ID``)
    full: str
    reasons: tuple[str, ...]
    created: float
    expires: float
    future: asyncio.Future[bool] = field(repr=False)

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "digest": self.digest,
            "principal": self.principal,
            "op": self.op,
            "target": self.target,
            "description": self.view.text,
            "shortened": self.view.shortened,
            "reasons": list(self.reasons),
            "seconds_left": max(0, round(self.expires - time.time())),
        }

    def details(self) -> dict[str, object]:
        """Everything ``public`` has, and the whole request."""
        return {**self.public(), "request": self.full}


def request_digest(principal: str, op: str, target: str, args: Mapping[str, object]) -> str:
    """What an answer is bound to: the whole request, every argument (not the text shown)."""
    canonical = json.dumps([principal, op, target, args], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def desktop_notifier(request: PendingRequest) -> None:
    """Best effort: tell a logged-in operator that something waits (real dom0 only). Only the
    gate's words and escaped names: notification daemons interpret markup in the body."""
    exe = shutil.which("notify-send")
    if exe is None:
        return
    subprocess.Popen(  # fixed argv, no shell
        [
            exe,
            "--app-name=qubes-mcp",
            "--urgency=critical",
            f"qubes-mcp: approval needed ({request.id})",
            f"{request.op} on {request.target} from {request.principal}: "
            "see qubes-mcp-admin pending",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def dialog_text(request: PendingRequest) -> tuple[str, str]:
    """The desktop dialog's title and text: the consent view and why it is asked."""
    title = f"qubes-mcp: {request.principal} asks ({request.id})"
    return title, f"{request.view.text}\n\nwhy: {'; '.join(request.reasons)}"


#: how many finished requests the broker remembers, so a late answer can be told why
RECENT_ANSWERS = 256


class ConsentBroker:
    """Holds the pending requests of one gate daemon, and the outcome of recent ones."""

    def __init__(
        self,
        timeout: float,
        notifier: Callable[[PendingRequest], None] | None = None,
        dialog: tuple[str, ...] = (),
        record: Callable[[PendingRequest, bool], Awaitable[bool]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.notifier = notifier
        self.dialog = dialog
        #: records a dialog's answer in the audit chain first (audit/acts.py); ``False``
        #: means it could not be, and the answer is not given (the CLI remains)
        self.record = record
        self._pending: dict[str, PendingRequest] = {}
        #: id -> approved | denied | timed-out | withdrawn, oldest first, bounded
        self._recent: OrderedDict[str, str] = OrderedDict()

    async def _ask_dialog(self, request: PendingRequest) -> None:
        """Show the operator's dialog; its exit code answers this request (and only it)."""
        title, text = dialog_text(request)
        argv = [a.replace("{title}", title).replace("{text}", text) for a in self.dialog]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            return  # no dialog here: the CLI remains the way to answer
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: answered elsewhere, or timed out
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if code in (0, 1):
            if self.record is not None and not await self.record(request, code == 0):
                return
            self.answer(request.id, approve=code == 0, digest=request.digest)

    def _remember(self, request_id: str, outcome: str) -> None:
        self._recent[request_id] = outcome
        while len(self._recent) > RECENT_ANSWERS:
            self._recent.popitem(last=False)

    async def ask(
        self,
        *,
        principal: str,
        op: str,
        target: str,
        args: Mapping[str, object],
        description: Description,
        reasons: tuple[str, ...],
        withdrawn: asyncio.Event | None = None,
        timeout: float | None = None,
    ) -> str:
        """Wait for the operator (``timeout`` seconds, the broker's by default: the gate passes
        the one of the configuration its request started under); returns the request id.

        Raises ``ConsentDeniedError`` (the operator said no), ``ConsentTimeoutError`` (no answer
        in time) or ``ConsentWithdrawnError`` (``withdrawn`` was set: the caller hung up). A
        withdrawn request leaves the queue at once; a hang-up wins over an answer that arrives
        in the same instant, because nobody is left to act for.
        """
        if withdrawn is not None and withdrawn.is_set():
            raise ConsentWithdrawnError(reason="the caller hung up before consent was asked")
        loop = asyncio.get_running_loop()
        wait = self.timeout if timeout is None else timeout
        now = time.time()
        request_id = secrets.token_hex(4)
        request = PendingRequest(
            id=request_id,
            digest=request_digest(principal, op, target, args),
            principal=escape(principal),
            op=escape(op),
            target=escape(target),
            view=description.view(request_id),
            full=description.full_text(),
            reasons=tuple(escape(r) for r in reasons),
            created=now,
            expires=now + wait,
            future=loop.create_future(),
        )
        self._pending[request.id] = request
        if self.notifier is not None:
            with contextlib.suppress(OSError):  # a courtesy; the queue is the interface
                self.notifier(request)
        dialog = asyncio.ensure_future(self._ask_dialog(request)) if self.dialog else None
        hangup = asyncio.ensure_future(withdrawn.wait()) if withdrawn is not None else None
        outcome = "cancelled"  # the gate is shutting down, if nothing below replaces it
        try:
            waiting: set[asyncio.Future[Any]] = {request.future}
            if hangup is not None:
                waiting.add(hangup)
            await asyncio.wait(waiting, timeout=wait, return_when=FIRST_COMPLETED)
            if withdrawn is not None and withdrawn.is_set():
                outcome = "withdrawn"
            elif request.future.done():
                outcome = "approved" if request.future.result() else "denied"
            else:
                outcome = "timed-out"
        finally:
            self._pending.pop(request.id, None)
            self._remember(request.id, outcome)
            for task in (dialog, hangup):
                if task is not None:
                    task.cancel()  # answered elsewhere, withdrawn or timed out: close it
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if outcome == "withdrawn":
            raise ConsentWithdrawnError(reason=f"consent {request.id} withdrawn: caller hung up")
        if outcome == "timed-out":
            raise ConsentTimeoutError(reason=f"consent {request.id} timed out")
        if outcome == "denied":
            raise ConsentDeniedError(reason=f"consent {request.id} denied")
        return request.id

    def pending(self) -> list[PendingRequest]:
        return sorted(self._pending.values(), key=lambda r: r.created)

    def show(self, request_id: str) -> dict[str, object] | None:
        """A pending request with the whole of what it asks (``qubes-mcp-admin show``)."""
        request = self._pending.get(request_id)
        return None if request is None else request.details()

    def answer(self, request_id: str, *, approve: bool, digest: str = "") -> str:
        """The operator's answer: ``approved``, ``denied``, ``mismatch``, or why there is nothing
        to answer: ``withdrawn``, ``timed-out``, ``already-answered`` or ``unknown``."""
        request = self._pending.get(request_id)
        if request is None or request.future.done():
            late = self._recent.get(request_id, "unknown")
            return late if late in ("withdrawn", "timed-out", "unknown") else "already-answered"
        if approve and not secrets.compare_digest(digest, request.digest):
            return "mismatch"
        request.future.set_result(approve)
        return "approved" if approve else "denied"
