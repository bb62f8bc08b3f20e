"""The gate daemon: the ``qmcp.*`` qrexec socket services, and the operator's socket.

``/etc/qubes-rpc/qmcp.<Op>`` are symlinks to the gate socket, exactly as the ``admin.*``
entries are symlinks to qubesd's: qrexec connects, writes the service descriptor
``qmcp.Op+ARG SOURCE name|keyword TARGET\\0``, then the caller's stdin, then EOF, and relays
whatever the gate writes back. The source and target in the descriptor come from the qrexec
daemon, so they are trusted; the payload after the NUL is the agent's.

The operator socket (mode 0600, dom0 root only) serves ``qubes-mcp-admin pending / show /
approve / deny / status`` as one JSON line each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.audit import AuditLog
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.consent import ConsentBroker, PendingRequest, desktop_notifier
from qubes_mcp.dom0.errors import GateError, InvalidInputError, NotFoundError
from qubes_mcp.dom0.gate import Gate, Request
from qubes_mcp.dom0.operator_audit import OperatorAct, UnrecordedActError, record_operator_act

log = logging.getLogger("qubes_mcp.gate")
_DESCRIPTOR_MAX = 1024
_OPERATOR_LINE_MAX = 4096
#: an answer on the operator socket (``show`` carries a whole request, ``pending`` many views)
_OPERATOR_REPLY_MAX = 64 << 20


def parse_descriptor(raw: bytes) -> tuple[str, str, str | None]:
    """``service+arg source type target`` → (service, source, target or None for dom0)."""
    parts = raw.decode("ascii", errors="replace").split(" ")
    if len(parts) != 4:
        raise NotFoundError(reason="malformed qrexec descriptor")
    service, source, kind, target = parts
    service = service.partition("+")[0]
    if (kind, target) in (("keyword", "adminvm"), ("name", "dom0")):
        return service, source, None
    if kind != "name":
        raise NotFoundError(reason="unexpected target type in descriptor")
    return service, source, target


async def _read_request(reader: asyncio.StreamReader, cap: int) -> Request:
    try:
        descriptor = await reader.readuntil(b"\0")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise NotFoundError(reason="no qrexec descriptor") from None
    service, source, target = parse_descriptor(descriptor[:-1])
    untrusted_payload = await reader.read(cap + 1)
    while len(untrusted_payload) <= cap and (more := await reader.read(cap + 1)):
        untrusted_payload += more
    if len(untrusted_payload) > cap:
        raise InvalidInputError(f"request is larger than {cap} bytes")
    return Request(service, source, target, untrusted_payload)


def _secure_socket_dir(path: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.chmod(path.parent, mode)


class GateDaemon:
    """Owns the sockets, the concurrency bound and the per-request deadline."""

    def __init__(
        self,
        config: GateConfig,
        *,
        audit: AuditLog | None = None,
        consent: ConsentBroker | None = None,
    ) -> None:
        self.config = config
        self.consent = consent or ConsentBroker(
            config.consent.timeout, desktop_notifier, config.consent.dialog, self._dialog_answer
        )
        # create=False: a log that vanished entirely must not silently restart at seq 1
        self.gate = Gate(
            config, audit or AuditLog(config.paths.audit_log, create=False), self.consent
        )
        #: requests being read (bounded memory, whoever sends them)
        self._reading = asyncio.Semaphore(4 * config.limits.concurrent_requests)
        #: requests being handled, per calling qube: one principal waiting on the operator
        #: with many requests cannot starve another principal
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._servers: list[asyncio.AbstractServer] = []

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with self._reading:
                try:
                    request = await asyncio.wait_for(
                        _read_request(reader, self.config.limits.request_bytes), 30
                    )
                except (InvalidInputError, NotFoundError) as exc:
                    reply: dict[str, Any] = exc.to_reply()
                    request = None
                except TimeoutError:
                    reply = InvalidInputError("request was not completed in time").to_reply()
                    request = None
            if request is not None:
                slots = self._slots.setdefault(
                    request.source, asyncio.Semaphore(self.config.limits.concurrent_requests)
                )
                async with slots:
                    reply = await self.gate.handle(request)
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the caller went away; the gate already finished (and audited) its work
        finally:
            writer.close()

    async def _serve_operator(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
            try:
                command = json.loads(line[:_OPERATOR_LINE_MAX])
                if isinstance(command, dict) and command.get("cmd") in ("approve", "deny"):
                    answer = await self._answer(command, _peer_uid(writer))
                else:
                    answer = self._operator(command)
            except (ValueError, TypeError, KeyError, AttributeError):
                answer = {"error": "bad command"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    def _operator(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "status":
            return {"status": self.gate.status()}
        if cmd == "pending":
            return {"pending": [r.public() for r in self.consent.pending()]}
        if cmd in ("approve", "deny"):
            result = self.consent.answer(
                str(command["id"]), approve=cmd == "approve", digest=str(command.get("digest", ""))
            )
            return {"result": result}
        if cmd == "show":  # the whole of one pending request, escaped
            shown = self.consent.show(str(command["id"]))
            return {"request": shown} if shown is not None else {"error": "unknown"}
        return {"error": "unknown command"}

    async def _answer(self, command: dict[str, Any], uid: int | None) -> dict[str, Any]:
        """``approve``/``deny``, recorded in the chain before the waiting request may go on,
        as an act of ``operator:<uid>`` with the peer's uid from the socket (operator_audit.py).
        An answer that cannot be recorded is not given."""
        request_id = str(command["id"])
        waiting = [r for r in self.consent.pending() if r.id == request_id]
        claimed = command.get("sudo_uid")
        act = OperatorAct(
            self.gate.audit,
            str(command["cmd"]),
            waiting[0].target if waiting else "",
            {"consent_id": request_id},
            uid=uid,
            claimed_sudo_uid=claimed if isinstance(claimed, int | str) else None,
        )
        try:
            if uid is None:
                raise UnrecordedActError(act.act, "the peer's uid is unknown")
            await asyncio.to_thread(act.begin)
        except UnrecordedActError as exc:
            log.error("%s", exc)
            return {"error": str(exc)}
        result = self._operator(command)["result"]
        try:
            await asyncio.to_thread(act.finish, ok=result in ("approved", "denied"), code=result)
        except GateError as exc:  # the answer is given; say loudly that its outcome is not
            log.error("the outcome of %s %s could not be recorded: %s", act.act, request_id, exc)
        return {"result": result}

    async def _dialog_answer(self, request: PendingRequest, approve: bool) -> bool:
        """Record an answer given in the desktop dialog (as the gate's uid, ``answered_by``
        dialog); ``False`` when it cannot be recorded, so that it is not given."""
        try:
            await asyncio.to_thread(
                record_operator_act,
                self.gate.audit,
                "approve" if approve else "deny",
                request.target,
                {"consent_id": request.id, "answered_by": "dialog"},
            )
        except GateError as exc:
            log.error("the dialog's answer to %s is not given: %s", request.id, exc)
            return False
        return True

    async def start(self) -> None:
        paths = self.config.paths
        _secure_socket_dir(paths.gate_socket, 0o755)
        self._servers.append(
            await asyncio.start_unix_server(
                self._serve_request, path=str(paths.gate_socket), limit=_DESCRIPTOR_MAX
            )
        )
        # qrexec (root) connects to the gate socket; nobody else needs to
        os.chmod(paths.gate_socket, 0o600)
        _secure_socket_dir(paths.operator_socket, 0o700)
        self._servers.append(
            await asyncio.start_unix_server(self._serve_operator, path=str(paths.operator_socket))
        )
        os.chmod(paths.operator_socket, 0o600)
        log.info("qubes-mcp gate serving on %s", paths.gate_socket)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await self.gate.flush()  # counted refusals go into the log before the gate stops
        self.gate.audit.close()


async def operator_call(socket_path: Path, command: dict[str, Any]) -> dict[str, Any]:
    """One operator command to a running gate (used by ``qubes-mcp-admin``)."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_OPERATOR_REPLY_MAX)
    try:
        writer.write(json.dumps(command).encode() + b"\n")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 30))
        return answer
    finally:
        writer.close()


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end of a unix socket (``SO_PEERCRED``), from the
    kernel: what an operator command claims about its sender is not trusted."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def run_gate(config: GateConfig, ready_file: Path | None = None) -> int:
    """Foreground entry point (``qubes-mcp-admin gate``): serve until SIGINT/SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        daemon = GateDaemon(config)
        await daemon.start()
        if ready_file is not None:
            ready_file.write_text(f"{os.getpid()}\n")
        try:
            await stop.wait()
        finally:
            await daemon.close()
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)

    asyncio.run(main())
    return 0
