"""A broken configuration refuses everything; it never makes the gate vanish (decision 0011).

:func:`load_for_gate` is where the daemon loads its configuration at start. (A later reload,
``GateDaemon.reload``, reads the file with the same ``load_config`` but keeps the configuration
it runs when the new one does not load, and fails the operator's command: decision 0017.)
A configuration that does not load is not a reason to exit: qrexec would then
answer every agent with exit 127, which reads as ``not-found``, and nothing would be recorded.
Instead the gate runs :class:`RefuseAllDaemon`: every request is answered ``unavailable`` and
every state-changing (or unknown) one is recorded as refused, where the audit log is usable;
the operator socket answers ``status`` and ``pending`` with the configuration error, so the
operator sees *why* rather than "the gate is not reachable".

At start it does not fall back to the last configuration that loaded: an operator who edits the
configuration is most often taking authority away, and a typo must not keep the old authority
alive. Where the sockets and the log are, though, has to come from somewhere: the ``[paths]``
table is read on its own (:func:`fallback_paths`), and defaults are used if even that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import DEFAULT_PATHS, GateConfig, Paths, load_config
from qubes_mcp.dom0.errors import ConfigError, GateError, UnavailableError
from qubes_mcp.dom0.operations import OPERATIONS_BY_SERVICE

log = logging.getLogger("qubes_mcp.gate")
#: why a gate in refuse-all mode does not reload: it never had a configuration to keep
REFUSE_ALL_RELOAD = (
    "the gate refuses everything because its configuration did not load when it started; "
    "restart it (systemctl restart qubes-mcp-gate) once the configuration loads"
)
_DESCRIPTOR_MAX = 1024
_DRAIN_BYTES = 1 << 20
_READ_SECONDS = 5.0


@dataclass(frozen=True)
class BrokenConfig:
    """A configuration that did not load: the problem, and where the gate's files are."""

    problem: str
    paths: Paths


def fallback_paths(path: Path) -> Paths:
    """The ``[paths]`` table of a configuration that does not load as a whole.

    Only the lines from ``[paths]`` to the next table header are parsed (as TOML); a path that
    is missing, not a string or not absolute keeps its default.
    """
    values = dict(DEFAULT_PATHS)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return Paths(**{k: Path(str(v)) for k, v in values.items()})
    section: list[str] = []
    inside = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped.replace(" ", "") == "[paths]"
            continue
        if inside:
            section.append(line)
    try:
        table: dict[str, Any] = tomllib.loads("\n".join(section))
    except tomllib.TOMLDecodeError:
        table = {}
    for key in values:
        value = table.get(key)
        if isinstance(value, str) and value.startswith("/"):
            values[key] = value
    return Paths(**{k: Path(str(v)) for k, v in values.items()})


def load_for_gate(path: Path) -> GateConfig | BrokenConfig:
    """The daemon's configuration, or what it needs to refuse everything without it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        log.error("qubes-mcp gate: the configuration does not load, refusing all: %s", exc)
        return BrokenConfig(str(exc), fallback_paths(path))


class RefuseAllDaemon:
    """The gate's sockets while the configuration is broken: every answer is ``unavailable``."""

    def __init__(self, broken: BrokenConfig) -> None:
        self.broken = broken
        self.audit = AuditLog(broken.paths.audit_log, create=False)
        self._servers: list[asyncio.AbstractServer] = []

    def _record(self, service: str, source: str, target: str) -> None:
        op = OPERATIONS_BY_SERVICE.get(service)
        if op is not None and not op.state_changing:
            return  # the running gate does not record reads either
        try:
            self.audit.append(
                principal=source,
                op=op.name if op else service,
                decision="refused",
                outcome="not-run",
                targets=[] if target in ("", "dom0", "@adminvm") else [target],
                code=UnavailableError.code,
                detail={"reason": "configuration error"},
            )
        except GateError as exc:
            log.error("qubes-mcp gate: audit log unavailable too: %s", exc.reason)

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ValueError):
                async with asyncio.timeout(_READ_SECONDS):
                    descriptor = await reader.readuntil(b"\0")
                    parts = descriptor[:-1].decode("ascii", errors="replace").split(" ")
                    await reader.read(_DRAIN_BYTES)
                    if len(parts) == 4:
                        service = parts[0].partition("+")[0]
                        await asyncio.to_thread(self._record, service, parts[1], parts[3])
            reply = UnavailableError().to_reply()
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def operator_answer(self, command: object) -> dict[str, Any]:
        cmd = command.get("cmd") if isinstance(command, dict) else None
        if cmd == "status":
            return {"mode": "refuse-all", "config_error": self.broken.problem}
        if cmd == "pending":
            return {"pending": [], "config_error": self.broken.problem}
        if cmd == "reload":
            return {"error": f"reload refused: {REFUSE_ALL_RELOAD}"}
        return {"error": "the gate refuses everything: the configuration does not load"}

    async def _serve_operator(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
            try:
                answer = self.operator_answer(json.loads(line[:4096]))
            except ValueError:
                answer = {"error": "bad command"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        paths = self.broken.paths
        for sock, mode, serve, limit in (
            (paths.gate_socket, 0o755, self._serve_request, _DESCRIPTOR_MAX),
            (paths.operator_socket, 0o700, self._serve_operator, 1 << 16),
        ):
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
            os.chmod(sock.parent, mode)
            self._servers.append(await asyncio.start_unix_server(serve, str(sock), limit=limit))
            os.chmod(sock, 0o600)
        log.error("qubes-mcp gate serving in refuse-all mode: %s", self.broken.problem)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.audit.close()
