"""How the MCP server reaches dom0: one qrexec call per tool call, JSON in, JSON out.

Two transports make the same call: :class:`QrexecTransport` runs ``qrexec-client-vm`` in the
control qube (production); :class:`SimTransport` goes through the emulator's qrexec router as
the principal (development, tests, demos). Both return the gate's ``result`` object or raise
:class:`GateRefusalError`.

A failure of a call to a qube (qrexec refused it, the client crashed or timed out, the reply
is not the gate's JSON) becomes the gate's not-found refusal, byte for byte: qrexec policy
refuses out-of-scope targets before the gate sees them, so an agent must not be able to tell
"refused by policy" from "refused by the gate" from "broken pipe".

A failure of the transport itself is ``unavailable``, because it says nothing about any qube:
the client cannot be started (no ``qrexec-client-vm``: not a qube, or no qubes-core-agent), the
emulator is not running, or a call to ``@adminvm`` -- dom0 always exists -- fails other than
by a policy refusal (exit 127: the ``qmcp.*`` service is missing or the gate is not listening;
any other exit: qrexec's own error). :func:`probe` gives ``qubes-mcp serve --check`` the raw
exit code and stderr to say which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qubes_mcp.server.table import ADMINVM, OpSpec, load_table

_log = logging.getLogger(__name__)

#: the production qrexec client inside a qube
QREXEC_CLIENT_VM = "/usr/lib/qubes/qrexec-client-vm"
#: largest reply accepted from the gate (command output is capped at 1 MiB per stream in dom0;
#: JSON escaping of binary output can grow it a few times)
MAX_REPLY_BYTES = 16 << 20
#: qrexec-client-vm's exit code when policy refuses the call
EXIT_REFUSED = 126
#: qubesd's qube-name rule; anything else never reaches the command line
_TARGET_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")


class GateRefusalError(Exception):
    """The gate (or qrexec on its behalf) refused: ``code`` and ``message`` are for the agent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _TransportFailureError(Exception):
    """The call did not produce a reply from the gate (reason for the server log only)."""


class _TransportUnavailableError(_TransportFailureError):
    """The transport itself does not work: no answer from dom0 for any call."""


#: qrexec's exit code when the service does not exist in dom0 (or its socket does not listen)
EXIT_NO_SERVICE = 127
UNAVAILABLE_CODE = "unavailable"
UNAVAILABLE_MESSAGE = "dom0 cannot be reached from this qube: the qubes-mcp gate is unavailable"


def not_found() -> GateRefusalError:
    """The refusal every failure of a call to a qube turns into."""
    table = load_table()
    return GateRefusalError(table.not_found_code, table.not_found_message)


def unavailable() -> GateRefusalError:
    """The refusal a failure of the transport itself turns into (it names no qube)."""
    assert UNAVAILABLE_CODE in load_table().codes
    return GateRefusalError(UNAVAILABLE_CODE, UNAVAILABLE_MESSAGE)


@dataclass(frozen=True)
class Probe:
    """One call's raw outcome, for ``serve --check``: ``exit_code`` None when the call never
    started (``problem`` says why)."""

    exit_code: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    problem: str = ""


def _failure(target: str, exit_code: int) -> _TransportFailureError:
    """A non-zero exit: a policy refusal, or for ``@adminvm`` a broken transport."""
    if target == ADMINVM and exit_code != EXIT_REFUSED:
        return _TransportUnavailableError(f"exit {exit_code}")
    return _TransportFailureError(f"exit {exit_code}")


def decode_reply(untrusted_stdout: bytes) -> dict[str, Any]:
    """The gate's reply → its ``result``; a refusal or anything malformed raises.

    Raises:
        GateRefusalError: the gate refused (its code and message), or the reply is not a
            well-formed gate reply (then the not-found refusal).
    """
    try:
        untrusted_reply = json.loads(untrusted_stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise not_found() from None
    if not isinstance(untrusted_reply, dict):
        raise not_found()
    if untrusted_reply.get("ok") is True and isinstance(untrusted_reply.get("result"), dict):
        result: dict[str, Any] = untrusted_reply["result"]
        return result
    untrusted_error = untrusted_reply.get("error")
    if untrusted_reply.get("ok") is False and isinstance(untrusted_error, dict):
        code = untrusted_error.get("code")
        message = untrusted_error.get("message")
        # only the gate's own vocabulary is relayed; a short message, printable text only
        if (
            code in load_table().codes
            and isinstance(message, str)
            and len(message) <= 1024
            and message.isprintable()
        ):
            raise GateRefusalError(code, message)
    raise not_found()


def check_target(target: str) -> str:
    """``@adminvm`` or a well-formed qube name; anything else is the not-found refusal."""
    if target == ADMINVM or _TARGET_RE.match(target):
        return target
    raise not_found()


@dataclass(frozen=True)
class Timeouts:
    """How long the server waits for dom0, ordered so dom0 always answers first.

    The gate bounds every wait it makes (a command's timeout, an event window, the operator's
    consent window); the server waits for that bound plus a margin, so a refusal or result
    from dom0 always arrives before the MCP call gives up.
    """

    #: the gate's consent window (``[consent] timeout``; the gate's default is 120 s)
    consent: float = 120.0
    #: added to every bound: process start-up, qubesd round trips, qube start
    margin: float = 30.0
    #: a short call (reads, pause …)
    short: float = 60.0
    #: a long call without its own bound (start, create, clone, remove …)
    long: float = 600.0

    def for_call(self, op: OpSpec, payload: dict[str, Any]) -> float:
        """The transport timeout for one call of ``op`` with ``payload``."""
        bound = self.long if op.long_running else self.short
        for key in ("timeout", "seconds"):  # the op's own bound, when it has one
            value = payload.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                bound = max(bound, float(value))
        if not op.read_only:
            # any state-changing call may wait for the operator (consent ops, guarded qubes)
            bound += self.consent
        return bound + self.margin


class Transport(Protocol):
    """One qrexec call to the gate."""

    async def call(self, target: str, service: str, payload: bytes, timeout: float) -> bytes:
        """Call ``service`` on ``target`` with ``payload``; return the gate's raw stdout.

        Raises:
            GateRefusalError: the call was refused or failed (the not-found refusal), or the
                transport does not work (``unavailable``).
        """
        ...


class Prober(Transport, Protocol):
    """A transport that can also report a call's raw outcome (``serve --check``)."""

    async def probe(self, target: str, service: str, payload: bytes, timeout: float) -> Probe:
        """The same call, raw: exit code, stdout, stderr; never raises for a failed call."""
        ...


async def invoke(
    transport: Transport, op: OpSpec, target: str, payload: dict[str, Any], timeouts: Timeouts
) -> dict[str, Any]:
    """Make ``op``'s call and return the gate's result (see :func:`decode_reply`)."""
    data = json.dumps(payload, separators=(",", ":")).encode()
    raw = await transport.call(
        check_target(target), op.service, data, timeouts.for_call(op, payload)
    )
    return decode_reply(raw)


async def _feed(stdin: asyncio.StreamWriter, payload: bytes) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        stdin.write(payload)
        await stdin.drain()
        stdin.close()


class QrexecTransport:
    """``qrexec-client-vm TARGET SERVICE`` with the payload on stdin (the control qube)."""

    def __init__(self, client: str = QREXEC_CLIENT_VM) -> None:
        self.client = client

    async def call(self, target: str, service: str, payload: bytes, timeout: float) -> bytes:
        try:
            code, out, _ = await self._call(target, service, payload, timeout)
            if code != 0:
                raise _failure(target, code)
            return out
        except _TransportUnavailableError as exc:
            _log.warning("%s on %s: transport unavailable: %s", service, target, exc)
            raise unavailable() from None
        except (_TransportFailureError, TimeoutError, OSError) as exc:
            # for whoever runs the server (its stderr), never for the agent
            _log.warning("%s on %s: %s %s", service, target, type(exc).__name__, exc)
            raise not_found() from None

    async def probe(self, target: str, service: str, payload: bytes, timeout: float) -> Probe:
        try:
            code, out, err = await self._call(target, service, payload, timeout, stderr=True)
        except _TransportUnavailableError as exc:
            return Probe(None, problem=str(exc))
        except TimeoutError:
            return Probe(None, problem=f"no answer within {timeout:g} s")
        except (_TransportFailureError, OSError) as exc:
            return Probe(None, problem=f"{type(exc).__name__}: {exc}")
        return Probe(code, out, err)

    async def _call(
        self, target: str, service: str, payload: bytes, timeout: float, *, stderr: bool = False
    ) -> tuple[int, bytes, bytes]:
        # own session: a timeout or cancellation kills the client and anything it started
        try:
            proc = await asyncio.create_subprocess_exec(
                self.client,
                target,
                service,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE if stderr else asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:  # no client, or not executable: nothing reaches dom0 at all
            raise _TransportUnavailableError(
                f"cannot run {self.client}: {exc.strerror or type(exc).__name__}"
            ) from None
        feeder: asyncio.Task[None] | None = None
        err = b""
        try:
            async with asyncio.timeout(timeout):
                assert proc.stdin is not None and proc.stdout is not None
                # written concurrently: a client that answers before reading must not deadlock
                feeder = asyncio.create_task(_feed(proc.stdin, payload))
                out = bytearray()
                while chunk := await proc.stdout.read(1 << 16):
                    out += chunk
                    if len(out) > MAX_REPLY_BYTES:
                        raise _TransportFailureError("reply too large")
                if proc.stderr is not None:
                    err = await proc.stderr.read(1 << 16)
                code = await proc.wait()
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                # reap it even when this task is being cancelled
                await asyncio.shield(proc.wait())
        return code, bytes(out), err


class SimTransport:
    """The same call through the emulator's qrexec router, as the principal's qube."""

    def __init__(self, root: Path, principal: str = "mcp-control") -> None:
        self.root = root
        self.principal = principal

    async def call(self, target: str, service: str, payload: bytes, timeout: float) -> bytes:
        try:
            probe = await self._call(target, service, payload, timeout)
        except _TransportUnavailableError as exc:
            _log.warning("%s on %s: transport unavailable: %s", service, target, exc)
            raise unavailable() from None
        if probe.exit_code is None:
            raise not_found()
        if probe.exit_code != 0:
            _log.info("%s on %s: exit %d", service, target, probe.exit_code)
            if isinstance(_failure(target, probe.exit_code), _TransportUnavailableError):
                raise unavailable()
            raise not_found()
        return probe.stdout

    async def probe(self, target: str, service: str, payload: bytes, timeout: float) -> Probe:
        try:
            return await self._call(target, service, payload, timeout)
        except _TransportUnavailableError as exc:
            return Probe(None, problem=str(exc))

    async def _call(self, target: str, service: str, payload: bytes, timeout: float) -> Probe:
        # the emulator is a development dependency of this transport only
        from qubes_mcp.sim.paths import SimPaths
        from qubes_mcp.sim.qrexec.client import RouterUnavailableError, call
        from qubes_mcp.sim.qrexec.wire import WireError

        out = bytearray()

        def collect(chunk: bytes) -> None:
            out.extend(chunk)
            if len(out) > MAX_REPLY_BYTES:
                raise _TransportFailureError("reply too large")

        err = bytearray()
        try:
            result = await call(
                SimPaths(self.root),
                source=self.principal,
                target=target,
                service_and_arg=service,
                stdin=payload,
                timeout=timeout,
                on_stdout=collect,
                on_stderr=lambda chunk: err.extend(chunk[: max(0, (1 << 16) - len(err))]),
            )
        except RouterUnavailableError as exc:
            raise _TransportUnavailableError(
                f"the emulator at {self.root} is not running ({exc})"
            ) from None
        except (_TransportFailureError, WireError, TimeoutError, OSError) as exc:
            _log.warning("%s on %s: %s %s", service, target, type(exc).__name__, exc)
            return Probe(None, problem=f"{type(exc).__name__}: {exc}")
        return Probe(result.exit_code, bytes(out), bytes(err))
