"""Consent: a request that needs the operator waits here until they answer, or time runs out.

The operator sees each pending request in dom0 (``qubes-mcp-admin pending``) with what it
will do, and answers with ``approve ID`` or ``deny ID``. An answer is bound to the exact
request: approving sends back the digest of the request the operator was shown, and a digest
that does not match (the request changed, or an ID was guessed) is not an approval. No answer
within the timeout is a refusal, and the gate answers the agent before its MCP call gives up
(the server's timeout is longer than the gate's consent timeout, see operations' docs).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qubes_mcp.dom0.errors import ConsentDeniedError


@dataclass
class PendingRequest:
    id: str
    digest: str
    principal: str
    op: str
    target: str
    description: str
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
            "description": self.description,
            "reasons": list(self.reasons),
            "seconds_left": max(0, round(self.expires - time.time())),
        }


DESCRIPTION_MAX = 4000


def safe_text(untrusted_text: str, limit: int = DESCRIPTION_MAX) -> str:
    """Text for the operator's terminal or desktop: parts of a description come from the agent
    (names, rule comments, command words), so control characters — terminal escapes above all —
    are shown as ``\\xNN`` and the length is capped. Newlines the gate itself puts between
    lines are kept; the agent's own arrive escaped, because each value is escaped separately
    (see ``gate.describe``)."""
    out = []
    for ch in untrusted_text:
        if ch == "\n" or (ch.isprintable() and ch not in "\u2028\u2029"):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + f" …[+{len(text) - limit} chars]"


def request_digest(principal: str, op: str, target: str, args: Mapping[str, object]) -> str:
    canonical = json.dumps([principal, op, target, args], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def desktop_notifier(request: PendingRequest) -> None:
    """Best effort: tell a logged-in operator that something waits (real dom0 only)."""
    exe = shutil.which("notify-send")
    if exe is None:
        return
    subprocess.Popen(  # fixed argv, no shell
        [
            exe,
            "--app-name=qubes-mcp",
            "--urgency=critical",
            f"qubes-mcp: approval needed ({request.id})",
            f"{request.description}\nqubes-mcp-admin approve {request.id}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class ConsentBroker:
    """Holds the pending requests of one gate daemon."""

    def __init__(
        self,
        timeout: float,
        notifier: Callable[[PendingRequest], None] | None = None,
        dialog: tuple[str, ...] = (),
    ) -> None:
        self.timeout = timeout
        self.notifier = notifier
        self.dialog = dialog
        self._pending: dict[str, PendingRequest] = {}

    async def _ask_dialog(self, request: PendingRequest) -> None:
        """Show the operator's dialog; its exit code answers this request (and only it)."""
        title = f"qubes-mcp: {request.principal} asks ({request.id})"
        text = f"{request.description}\n\nwhy: {'; '.join(request.reasons)}"
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
            self.answer(request.id, approve=code == 0, digest=request.digest)

    async def ask(
        self,
        *,
        principal: str,
        op: str,
        target: str,
        args: Mapping[str, object],
        description: str,
        reasons: tuple[str, ...],
    ) -> str:
        """Wait for the operator. Returns the request id; raises ConsentDeniedError."""
        loop = asyncio.get_running_loop()
        now = time.time()
        request = PendingRequest(
            id=secrets.token_hex(4),
            digest=request_digest(principal, op, target, args),
            principal=principal,
            op=op,
            target=target,
            description=safe_text(description),
            reasons=tuple(safe_text(r, 200) for r in reasons),
            created=now,
            expires=now + self.timeout,
            future=loop.create_future(),
        )
        self._pending[request.id] = request
        if self.notifier is not None:
            with contextlib.suppress(OSError):  # a courtesy; the queue is the interface
                self.notifier(request)
        dialog = asyncio.ensure_future(self._ask_dialog(request)) if self.dialog else None
        try:
            approved = await asyncio.wait_for(asyncio.shield(request.future), self.timeout)
        except TimeoutError:
            raise ConsentDeniedError(reason=f"consent {request.id} timed out") from None
        finally:
            self._pending.pop(request.id, None)
            if dialog is not None:
                dialog.cancel()  # answered elsewhere or timed out: close the dialog
                with contextlib.suppress(asyncio.CancelledError):
                    await dialog
        if not approved:
            raise ConsentDeniedError(reason=f"consent {request.id} denied")
        return request.id

    def pending(self) -> list[PendingRequest]:
        return sorted(self._pending.values(), key=lambda r: r.created)

    def answer(self, request_id: str, *, approve: bool, digest: str = "") -> str:
        """The operator's answer: ``approved``, ``denied``, ``unknown`` or ``mismatch``."""
        request = self._pending.get(request_id)
        if request is None or request.future.done():
            return "unknown"
        if approve and not secrets.compare_digest(digest, request.digest):
            return "mismatch"
        request.future.set_result(approve)
        return "approved" if approve else "denied"
