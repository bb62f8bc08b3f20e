"""The gate daemon: the ``qmcp.*`` qrexec socket services, and the operator's socket.

``/etc/qubes-rpc/qmcp.<Op>`` are symlinks to the gate socket, exactly as the ``admin.*``
entries are symlinks to qubesd's: qrexec connects, writes the service descriptor
``qmcp.Op+ARG SOURCE name|keyword TARGET\\0``, then the caller's stdin, then EOF, and relays
whatever the gate writes back. The source and target in the descriptor come from the qrexec
daemon, so they are trusted; the payload after the NUL is the agent's.

The operator socket (mode 0600, dom0 root only) serves ``qubes-mcp-admin pending / show /
approve / deny / status / reload`` as one JSON line each way.

Reloading (``qubes-mcp-admin reload``, ``install``, or SIGHUP) reads the configuration file
again and puts it in place at one point, :meth:`GateDaemon.use`; a request keeps the
configuration it arrived under to its end. A configuration that does not load, or that changes
what cannot change while the gate runs (``[paths]``), is refused: the running one stays, and
the refusal is logged, recorded and answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.admission import Admission, Share
from qubes_mcp.dom0.audit.acts import OperatorAct, UnrecordedActError, record_operator_act
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.broken_config import REFUSE_ALL_RELOAD, BrokenConfig, RefuseAllDaemon
from qubes_mcp.dom0.config import GateConfig, config_digest, load_config, restart_only_changes
from qubes_mcp.dom0.consent import ConsentBroker, PendingRequest, desktop_notifier
from qubes_mcp.dom0.errors import (
    BusyError,
    ConfigError,
    GateError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
    WithdrawnError,
)
from qubes_mcp.dom0.gate import Gate, Request, unless_withdrawn
from qubes_mcp.dom0.hangup import HangupWatcher
from qubes_mcp.dom0.operations import OPERATIONS_BY_SERVICE
from qubes_mcp.dom0.recovery import Recovery, recover_until_done
from qubes_mcp.dom0.render import POLICY_NAME, render_policy

log = logging.getLogger("qubes_mcp.gate")
_DESCRIPTOR_MAX = 1024
_OPERATOR_LINE_MAX = 4096
#: an answer on the operator socket (``show`` carries a whole request, ``pending`` many views)
_OPERATOR_REPLY_MAX = 64 << 20
#: recovery's qubesd calls: short, so a hung qubesd cannot hold the create lock for long
RECOVERY_CALL_SECONDS = 10.0
#: connections the kernel queues before the gate accepts them (a burst waits, not fails)
_BACKLOG = 1024
#: qrexec writes the descriptor as it connects: a connection silent for this long is dropped
DESCRIPTOR_TIMEOUT = 2.0
#: on SIGTERM, requests in flight get this long to finish before they are stopped
SHUTDOWN_GRACE = 5.0
#: seconds a caller has to take its reply (command output can be megabytes)
REPLY_TIMEOUT = 60.0
#: what a reload says when the qrexec policy on disk lags the configuration it put in place
POLICY_NOT_CURRENT = (
    "the installed qrexec policy is not what this configuration renders (who may call the "
    "gate is still decided by the old one): run `qubes-mcp-admin install`"
)
#: state-changing requests refused busy are recorded as one line per qube and service per window
BUSY_WINDOW = 1.0


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


async def _read_descriptor(reader: asyncio.StreamReader) -> tuple[str, str, str | None]:
    try:
        descriptor = await reader.readuntil(b"\0")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise NotFoundError(reason="no qrexec descriptor") from None
    return parse_descriptor(descriptor[:-1])


async def _read_payload(reader: asyncio.StreamReader, cap: int) -> bytes:
    """The caller's input up to its EOF; more than ``cap`` bytes is a refusal (the rest is
    left unread: qrexec stops relaying input once the service closes, and still delivers the
    reply, ``libqrexec/remote.c``)."""
    untrusted_payload = await reader.read(cap + 1)
    while len(untrusted_payload) <= cap and (more := await reader.read(cap + 1)):
        untrusted_payload += more
    if len(untrusted_payload) > cap:
        raise InvalidInputError(f"request is larger than {cap} bytes")
    return untrusted_payload


async def _answer(writer: asyncio.StreamWriter, reply: dict[str, Any] | None) -> None:
    """One JSON line, unless nobody is left to read it; a caller that does not take it within
    :data:`REPLY_TIMEOUT` loses it (TimeoutError)."""
    if reply is None:
        return
    writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
    async with asyncio.timeout(REPLY_TIMEOUT):
        await writer.drain()


def _secure_socket_dir(path: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.chmod(path.parent, mode)


class GateDaemon:
    """Owns the sockets, each calling qube's share of the gate, and the time bounds.

    A request's life here: an anonymous place until its descriptor arrives (admission.py),
    then a place in its qube's share while its input is received (``request_read_timeout``
    from the connection), then a wait for one of its qube's acting slots, then the gate. The
    caller's hang-up withdraws it wherever it still waits (hangup.py). Every refusal on the
    way is answered, and audited by the gate like any other.
    """

    def __init__(
        self,
        config: GateConfig,
        *,
        audit: AuditLog | None = None,
        consent: ConsentBroker | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        #: where ``reload`` reads the configuration again (None: this gate cannot reload)
        self.config_path = config_path
        self._reloading = asyncio.Lock()
        self.consent = consent or ConsentBroker(
            config.consent.timeout, desktop_notifier, config.consent.dialog, self._dialog_answer
        )
        # create=False: a log that vanished entirely must not silently restart at seq 1
        self.gate = Gate(
            config, audit or AuditLog(config.paths.audit_log, create=False), self.consent
        )
        self.admission = Admission(
            config.principals,
            open_max=config.limits.open_requests,
            acting_max=config.limits.concurrent_requests,
        )
        self.hangups = HangupWatcher()
        #: requests refused at the door because their qube's share was full (per source)
        self.busy: Counter[str] = Counter()
        self._busy_unrecorded: Counter[tuple[str, str]] = Counter()
        self._busy_summary: asyncio.Task[None] | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._requests: set[asyncio.Task[None]] = set()

    def use(self, config: GateConfig) -> None:
        """Put ``config`` in place: the one point where a reload changes what the gate does.

        Everything derived from the configuration follows it here: the gate's decisions,
        budgets, tiers and consent rules (``Gate.config``), the rate limits, the consent
        timeout and dialog, each principal's share of the daemon, and the request bounds read
        from ``self.config`` as each request arrives. A request already in flight keeps the
        object it started with (``Gate.handle``), so it ends under the rules it began under.
        """
        self.config = config
        self.gate.config = config
        self.gate.limiter.configure(config.limits)
        self.consent.timeout = config.consent.timeout
        self.consent.dialog = config.consent.dialog
        self.admission.configure(
            config.principals,
            open_max=config.limits.open_requests,
            acting_max=config.limits.concurrent_requests,
        )
        _raise_open_files_limit(self.admission.bound)

    async def reload(
        self,
        *,
        uid: int | None,
        claimed_sudo_uid: int | str | None = None,
        signal_name: str | None = None,
    ) -> dict[str, Any]:
        """Read the configuration file again and put it in place, or keep the running one and
        say why. Recorded as the operator act ``reload`` (not done if it cannot be)."""
        async with self._reloading:
            old = self.config
            if self.config_path is None:
                return {"error": "reload refused: this gate was not started from a file"}
            detail: dict[str, object] = {} if signal_name is None else {"signal": signal_name}
            act = OperatorAct(
                self.gate.audit, "reload", "", detail, uid=uid, claimed_sudo_uid=claimed_sudo_uid
            )
            try:
                if uid is None:
                    raise UnrecordedActError(act.act, "the peer's uid is unknown")
                await asyncio.to_thread(act.begin)
            except UnrecordedActError as exc:
                log.error("qubes-mcp gate: %s", exc)
                return {"error": str(exc), "running": old.digest}
            problem, new = await asyncio.to_thread(self._read_config, old, detail)
            if new is None:
                log.error(
                    "qubes-mcp gate: RELOAD REFUSED, still running the configuration with "
                    "sha256 %s: %s",
                    old.digest,
                    problem,
                )
                await self._finish(act, ok=False)
                return {
                    "error": f"reload refused: {problem}; the gate keeps running the "
                    f"configuration it had (sha256 {old.digest})",
                    "running": old.digest,
                }
            self.use(new)
            log.info(
                "qubes-mcp gate: configuration reloaded from %s (sha256 %s, was %s)",
                self.config_path,
                new.digest,
                old.digest,
            )
            # a lowered ceiling or default_tier, or a principal gone, can take net from a
            # link's end: its links close now (decision record 0018)
            await self.gate.revalidate_links("tier below net after a reload")
            await self._finish(act, ok=True)
            answer: dict[str, Any] = {
                "result": "reloaded",
                "running": new.digest,
                "previous": old.digest,
                "policy_current": await asyncio.to_thread(self._policy_current),
            }
            if not answer["policy_current"]:
                log.warning("qubes-mcp gate: %s", POLICY_NOT_CURRENT)
            return answer

    def _policy_current(self) -> bool:
        """Whether the installed qrexec policy is what the running configuration renders
        (a reload does not write it: ``install`` does, before it asks for the reload)."""
        installed = self.config.paths.policy_dir / POLICY_NAME
        try:
            text = installed.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        return text == render_policy(self.config, self.gate.registry.current())

    def _read_config(
        self, old: GateConfig, detail: dict[str, object]
    ) -> tuple[str, GateConfig | None]:
        """The file's configuration, or why it may not replace ``old``."""
        assert self.config_path is not None
        with contextlib.suppress(OSError):
            detail["config_sha256"] = config_digest(self.config_path.read_bytes())
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return f"the configuration does not load: {exc}", None
        detail["config_sha256"] = new.digest
        fixed = restart_only_changes(old, new)
        if fixed:
            return (
                f"{', '.join(fixed)} cannot change while the gate runs "
                "(restart the gate to take it on, or put the old value back)",
                None,
            )
        return "", new

    @staticmethod
    async def _finish(act: OperatorAct, *, ok: bool) -> None:
        try:
            await asyncio.to_thread(act.finish, ok=ok, code="" if ok else "invalid-input")
        except GateError as exc:
            log.error("the outcome of reload could not be recorded: %s", exc)

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        config = self.config  # this request's, to its end, whatever a reload does meanwhile
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.limits.request_read_timeout
        reply: dict[str, Any] | None = None
        try:
            with self.admission.anonymous(writer.transport):
                try:
                    async with asyncio.timeout_at(min(deadline, loop.time() + DESCRIPTOR_TIMEOUT)):
                        service, source, target = await _read_descriptor(reader)
                except NotFoundError as exc:
                    if writer.transport.is_closing():
                        return  # dropped to make room (admission.py): nobody to answer
                    reply = exc.to_reply()  # not a qrexec call: one fixed refusal
                except (TimeoutError, ConnectionError):
                    return  # never said who it is (or was dropped to make room)
            if reply is None:
                try:
                    # one share for the whole request, whatever a reload does meanwhile
                    share = self.admission.share(source)
                    with share.hold():
                        reply = await self._serve_identified(
                            reader,
                            writer,
                            config,
                            share,
                            deadline=deadline,
                            service=service,
                            source=source,
                            target=target,
                        )
                        # still in the share: a caller that does not read its reply holds
                        # a place of its own qube's, for a bounded time
                        await _answer(writer, reply)
                        return
                except BusyError as exc:
                    self._refused_busy(service, source)
                    reply = exc.to_reply()
            await _answer(writer, reply)
        except (ConnectionError, OSError, TimeoutError):
            pass  # the caller went away; the gate already finished (and audited) its work
        except asyncio.CancelledError:
            # close() stopped it: the gate refused (and recorded) what had not acted; tell
            # the caller. The task then ends normally: a handler task that ends cancelled
            # makes asyncio's stream server log a traceback for every one of them.
            with contextlib.suppress(Exception):
                writer.write(json.dumps(UnavailableError().to_reply()).encode() + b"\n")
        finally:
            writer.close()
            self._requests.discard(task)

    async def _serve_identified(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: GateConfig,
        share: Share,
        *,
        deadline: float,
        service: str,
        source: str,
        target: str | None,
    ) -> dict[str, Any] | None:
        """Receive the input within the deadline, wait for an acting slot, hand it to the gate.

        Returns None when nobody is left to answer (the caller hung up)."""
        try:
            async with asyncio.timeout_at(deadline):
                untrusted_payload = await _read_payload(reader, config.limits.request_bytes)
        except InvalidInputError as exc:
            return await self.gate.refuse_unread(service, source, target, exc, config)
        except TimeoutError:
            late = InvalidInputError("request was not completed in time")
            return await self.gate.refuse_unread(service, source, target, late, config)
        except ConnectionError:
            await self.gate.refuse_unread(service, source, target, WithdrawnError(), config)
            return None
        sock = writer.get_extra_info("socket")
        with self.hangups.watch(sock.fileno()) as hangup:
            request = Request(service, source, target, untrusted_payload, hangup)
            slots = share.acting
            try:
                await unless_withdrawn(request, slots.acquire(), undo=lambda _: slots.release())
            except WithdrawnError as exc:
                await self.gate.refuse_unread(service, source, target, exc, config)
                return None
            try:
                return await self.gate.handle(request, config)
            finally:
                slots.release()

    def _refused_busy(self, service: str, source: str) -> None:
        """A request over its qube's share: refused at once, unread. State-changing ones are
        recorded as one summary line per qube and service per :data:`BUSY_WINDOW` (a line each
        would let a flood write without bound: the share is full, nothing else bounds it)."""
        self.busy[source] += 1
        if self.busy[source] in (1, 10, 100) or self.busy[source] % 1000 == 0:
            log.warning(
                "qubes-mcp gate: %s is over its share (%d open requests): %d refused busy so far",
                source,
                self.admission.share(source).open_max,
                self.busy[source],
            )
        op = OPERATIONS_BY_SERVICE.get(service)
        if op is not None and not op.state_changing:
            return  # reads are not audited, refused or not
        self._busy_unrecorded[(source, service)] += 1
        if self._busy_summary is None or self._busy_summary.done():
            self._busy_summary = asyncio.create_task(self._record_busy(BUSY_WINDOW))

    async def _record_busy(self, delay: float) -> None:
        await asyncio.sleep(delay)
        while self._busy_unrecorded:
            (source, service), count = self._busy_unrecorded.popitem()
            summary = BusyError(reason=f"{count} request(s) over the qube's share, summarised")
            await self.gate.refuse_unread(service, source, None, summary)

    async def _serve_operator(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
            try:
                command = json.loads(line[:_OPERATOR_LINE_MAX])
                if isinstance(command, dict) and command.get("cmd") in ("approve", "deny"):
                    answer = await self._answer(command, _peer_uid(writer))
                elif isinstance(command, dict) and command.get("cmd") == "reload":
                    claimed = command.get("sudo_uid")
                    answer = await self.reload(
                        uid=_peer_uid(writer),
                        claimed_sudo_uid=claimed if isinstance(claimed, int | str) else None,
                    )
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
            self._requests.discard(task)

    def _operator(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "status":
            return {
                "mode": "serving",
                "status": self.gate.status(),
                "config_sha256": self.config.digest,
                "config_path": str(self.config_path or ""),
                "pending": [r.id for r in self.consent.pending()],
            }
        if cmd == "pending":
            return {"pending": [r.public() for r in self.consent.pending()]}
        if cmd == "plans":
            return {"plans": self.gate.plans.public()}
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
        as an act of ``operator:<uid>`` with the peer's uid from the socket (audit/acts.py).
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
                self._serve_request,
                path=str(paths.gate_socket),
                limit=_DESCRIPTOR_MAX,
                backlog=_BACKLOG,
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
        """Stop accepting; give requests in flight :data:`SHUTDOWN_GRACE` to finish, then stop
        the rest: one that has not acted is refused ``unavailable`` and audited (gate.py), one
        that has keeps its ``pending`` line for start-up recovery. One log line in all."""
        for server in self._servers:
            server.close()
        in_flight = set(self._requests)
        stopped = 0
        if in_flight:
            _, pending = await asyncio.wait(in_flight, timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            stopped = len(pending)
            if pending:
                await asyncio.wait(pending)
            log.info(
                "qubes-mcp gate: stopping; %d request(s) in flight, %d finished, %d stopped",
                len(in_flight),
                len(in_flight) - stopped,
                stopped,
            )
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await self.gate.flush()  # counted refusals go into the log before the gate stops
        if self._busy_summary is not None:
            self._busy_summary.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._busy_summary
        await self._record_busy(0)  # what is still to be summarised
        await self.hangups.close()
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


def _raise_open_files_limit(connections: int) -> None:
    """Room for every connection the shares admit, plus what requests in flight open
    (qubesd connections, command pipes): the soft limit is raised towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("qubes-mcp gate: open files limited to %d (%d wanted)", new, wanted)


def run_gate(
    config: GateConfig | BrokenConfig,
    ready_file: Path | None = None,
    config_path: Path | None = None,
) -> int:
    """Foreground entry point (``qubes-mcp-admin gate``): serve until SIGINT/SIGTERM; on
    SIGHUP, reload ``config_path`` (:meth:`GateDaemon.reload`, recorded as the gate's uid).

    With a configuration that did not load (``load_for_gate``), serve in refuse-all mode
    instead of exiting. Otherwise reconcile what the previous run left unfinished
    (dom0/recovery.py) before serving — or, while qubesd is unreachable, in the background.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        daemon: GateDaemon | RefuseAllDaemon
        recovering: asyncio.Task[None] | None = None
        if isinstance(config, BrokenConfig):
            daemon = RefuseAllDaemon(config)
        else:
            daemon = GateDaemon(config, config_path=config_path)
            _raise_open_files_limit(daemon.admission.bound)
            first = asyncio.Event()
            recovery = Recovery(
                config,
                AdminClient(config.paths.qubesd_socket, timeout=RECOVERY_CALL_SECONDS),
                daemon.gate.audit,
            )
            recovering = asyncio.create_task(
                recover_until_done(recovery, daemon.gate.create_lock, first)
            )
            await first.wait()
            # then the registry (decision 0010): forget registrations of qubes that are gone,
            # and watch qubesd's deletions, before the first request; if qubesd is down, the
            # first request tries again
            try:
                await daemon.gate.ensure_reconciled()
            except (GateError, OSError) as exc:
                log.error("qubes-mcp gate: registry not reconciled yet: %s", type(exc).__name__)
        reloads: set[asyncio.Task[dict[str, Any]]] = set()

        def hangup() -> None:
            if isinstance(daemon, RefuseAllDaemon):
                log.error("qubes-mcp gate: SIGHUP ignored: %s", REFUSE_ALL_RELOAD)
                return
            task = loop.create_task(daemon.reload(uid=os.getuid(), signal_name="SIGHUP"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, hangup)
        await daemon.start()
        if ready_file is not None:
            ready_file.write_text(f"{os.getpid()}\n")
        try:
            await stop.wait()
        finally:
            if recovering is not None:
                recovering.cancel()
            if reloads:
                await asyncio.wait(reloads)
            await daemon.close()
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)

    asyncio.run(main())
    return 0
