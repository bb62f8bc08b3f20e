"""``qubes-mcp serve --check``: one harmless call to dom0, and exactly what is wrong.

The call is ``qmcp.List`` on ``@adminvm`` -- read-only, in every principal's policy -- made
through the transport ``serve`` would use. Unlike a tool call, whose failures are folded into
``not-found`` or ``unavailable`` for the agent, the check shows the operator the raw outcome
and names its cause:

- no ``qrexec-client-vm`` (not a Qubes qube, or qubes-core-agent missing), or the emulator is
  not running;
- exit 126: qrexec policy in dom0 refused the call (this qube is not a principal, or
  ``install`` has not been run);
- exit 127: dom0 has no ``qmcp.List`` service, or the gate is not listening on its socket;
- any other exit: qrexec's own error, with its stderr;
- a reply that is not the gate's, or the gate's refusal (e.g. a broken configuration);
- or OK, with the principal and the size of its scope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from qubes_mcp.server.table import ADMINVM
from qubes_mcp.server.transport import (
    EXIT_NO_SERVICE,
    EXIT_REFUSED,
    GateRefusalError,
    Prober,
    decode_reply,
)

SERVICE = "qmcp.List"
TIMEOUT = 30.0
_STDERR_SHOWN = 300


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    message: str


def _stderr(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    text = "".join(c if c.isprintable() else "?" for c in text)[:_STDERR_SHOWN]
    return f" ({text})" if text else ""


def _is_refusal(raw: bytes) -> bool:
    """Whether ``raw`` is a well-formed refusal (``decode_reply`` relayed its code)."""
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return isinstance(reply, dict) and reply.get("ok") is False


async def check(transport: Prober, timeout: float = TIMEOUT) -> CheckResult:
    """Make the call and say what it shows."""
    probe = await transport.probe(ADMINVM, SERVICE, b"{}", timeout)
    if probe.exit_code is None:
        return CheckResult(False, f"cannot reach dom0: {probe.problem}")
    if probe.exit_code == EXIT_REFUSED:
        return CheckResult(
            False,
            f"qrexec policy in dom0 refused {SERVICE} from this qube (exit 126)"
            f"{_stderr(probe.stderr)}: is this qube a [[principal]] in dom0's "
            "/etc/qubes-mcp/config.toml, and has `qubes-mcp-admin install` been run since? "
            "(`qubes-mcp-admin doctor` in dom0)",
        )
    if probe.exit_code == EXIT_NO_SERVICE:
        return CheckResult(
            False,
            f"dom0 has no {SERVICE} service, or the gate is not running (exit 127)"
            f"{_stderr(probe.stderr)}: in dom0 run `qubes-mcp-admin install` and "
            "`systemctl enable --now qubes-mcp-gate`, then `qubes-mcp-admin status`",
        )
    if probe.exit_code != 0:
        return CheckResult(
            False,
            f"qrexec failed (exit {probe.exit_code}){_stderr(probe.stderr)}: "
            "is the qrexec agent of this qube running?",
        )
    try:
        result = decode_reply(probe.stdout)
    except GateRefusalError as exc:
        if _is_refusal(probe.stdout):
            return CheckResult(False, f"the gate refused: {exc.code}: {exc.message}")
        return CheckResult(False, f"dom0 answered {SERVICE}, but not with the gate's reply")
    qubes = result.get("qubes")
    principal = result.get("principal")
    if not isinstance(qubes, list) or not isinstance(principal, str):
        return CheckResult(False, f"the gate's {SERVICE} reply lacks its principal or qubes")
    sinks = result.get("dump_sinks")
    extra = f" and {len(sinks)} dump sink(s)" if isinstance(sinks, list) and sinks else ""
    return CheckResult(
        True,
        f"OK: the gate answers; principal {json.dumps(principal)} has {len(qubes)} "
        f"qube(s) in scope{extra}",
    )
