"""The operator's acts in the same audit chain as the agents' requests.

``install``, ``reload``, ``enrol``, ``unenrol``, ``tier``, ``approve``, ``deny`` and
``uninstall`` change what an agent may do as surely as a request does, so each is recorded,
with the operator's uid, by :func:`record_operator_act` — one function, appending through the
same :class:`~qubes_mcp.dom0.audit.log.AuditLog` API and therefore under the log's file lock
(the gate may be appending at the same moment from its own process).

An act is recorded like a request: a ``pending`` line before it is done, then its outcome
line with the same ``request_id`` (``audit show`` pairs them into one line). The pending line
is the fail-closed point: if it cannot be written (no log, a full disk, a broken tail) the
act is refused before anything changes. Only ``uninstall --purge`` proceeds without it, since
it removes the log on purpose.

The principal is ``operator:<uid>``: ``os.getuid()`` for the command line, the peer's
``SO_PEERCRED`` uid for answers arriving on the gate's operator socket (never a uid the
message claims). ``sudo`` sets ``SUDO_UID`` to the user who ran it; when that differs it is
recorded as ``sudo_uid`` beside it (a claim by the environment, useful to tell people apart
who all act as root in dom0).
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from qubes_mcp.dom0.audit.files import chain_exists
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.record import AuditRecord
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.errors import GateError

#: the acts that are recorded; ``op`` of their records is ``operator.<act>``
ACTS: Final = frozenset(
    {"install", "reload", "enrol", "unenrol", "tier", "approve", "deny", "uninstall"}
)
#: arguments of an act that go into ``detail`` (each an allowlisted audit key)
_ARG_DETAIL: Final = ("tier", "scope", "purge")


class UnrecordedActError(GateError):
    """The act could not be recorded, so it is not done."""

    def __init__(self, act: str, reason: str) -> None:
        super().__init__(None, reason=reason)
        self.text = (
            f"{act} refused: it cannot be recorded in the audit log ({reason}); nothing was "
            "changed. Check the log with `qubes-mcp-admin audit verify`."
        )

    def __str__(self) -> str:
        return self.text


def sudo_uid(environ: Mapping[str, str] = os.environ) -> int | str | None:
    """``SUDO_UID`` as sudo set it (an int), a malformed value as text (the log tames it), or
    ``None`` when unset."""
    raw = environ.get("SUDO_UID")
    if raw is None or raw == "":
        return None
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else raw


def record_operator_act(
    log: AuditLog | Path,
    act: str,
    target: str = "",
    detail: Mapping[str, object] | None = None,
    *,
    outcome: str = "ok",
    code: str = "",
    request_id: str = "",
    uid: int | None = None,
    claimed_sudo_uid: int | str | None = None,
) -> AuditRecord:
    """Append one record of an operator's act to the chain (the log's lock held meanwhile).

    Args:
        log: the gate's open log, or the path of the log (opened with ``create=False``:
            an act never starts a new chain).
        act: one of :data:`ACTS`.
        target: the qube (or consent request id) the act is about, if any.
        detail: allowlisted facts about the act (its tier, scope, …).
        outcome: ``pending`` before the act, ``ok``/``failed`` after it.
        uid: the operator's uid; the calling process's by default.
        claimed_sudo_uid: ``SUDO_UID`` (recorded beside ``uid`` when it differs).

    Raises:
        AuditError: the record could not be written (the caller refuses the act).
        ValueError: ``act`` is not an operator act (a bug).
    """
    if act not in ACTS:
        raise ValueError(f"not an operator act: {act!r}")
    uid = os.getuid() if uid is None else uid
    facts: dict[str, object] = {**(detail or {}), "uid": uid}
    if claimed_sudo_uid is not None and claimed_sudo_uid != uid:
        facts["sudo_uid"] = claimed_sudo_uid
    opened = log if isinstance(log, AuditLog) else AuditLog(log, create=False)
    try:
        return opened.append(
            principal=f"operator:{uid}",
            op=f"operator.{act}",
            decision="allowed",
            outcome=outcome,
            targets=[target] if target else [],
            code=code,
            request_id=request_id,
            detail=facts,
        )
    finally:
        if opened is not log:
            opened.close()


@dataclass
class OperatorAct:
    """An act recorded as ``pending``, waiting for its outcome line (:meth:`finish`)."""

    log: AuditLog | Path
    act: str
    target: str = ""
    detail: Mapping[str, object] = field(default_factory=dict)
    uid: int | None = None
    claimed_sudo_uid: int | str | None = None
    request_id: str = field(default_factory=lambda: "op-" + secrets.token_hex(8))

    def begin(self) -> None:
        """Write the pending line.

        Raises:
            UnrecordedActError: it could not be written; the act must not be done.
        """
        try:
            self._record("pending")
        except GateError as exc:
            raise UnrecordedActError(self.act, exc.reason or exc.message) from exc

    def finish(self, *, ok: bool, code: str = "") -> None:
        """Write the outcome line (``ok`` or ``failed`` with ``code``).

        Raises:
            AuditError: the act was done but its outcome could not be recorded.
        """
        self._record("ok" if ok else "failed", code="" if ok else code or "failed")

    def _record(self, outcome: str, code: str = "") -> None:
        record_operator_act(
            self.log,
            self.act,
            self.target,
            self.detail,
            outcome=outcome,
            code=code,
            request_id=self.request_id,
            uid=self.uid,
            claimed_sudo_uid=self.claimed_sudo_uid,
        )


CliCommand = Callable[[argparse.Namespace], int]


def audited(
    config_of: Callable[[argparse.Namespace], GateConfig], act: str | None = None
) -> Callable[[CliCommand], CliCommand]:
    """Decorate a ``qubes-mcp-admin`` command so that it is recorded as an operator act.

    The act is ``act``, or the subcommand's name (``args.command``: tier, enrol, unenrol);
    the target is ``args.qube`` when there is one. The pending line is written first and the
    command does not run when it cannot be; its exit status becomes the outcome line.

    ``install`` may be what starts the chain (and write the configuration): when there is no
    chain yet, its record is written once it has run. ``uninstall --purge`` runs even when
    it cannot be recorded, and writes no outcome line once the log is gone.
    """

    def decorate(command: CliCommand) -> CliCommand:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            name = act or str(args.command)
            purge = name == "uninstall" and bool(getattr(args, "purge", False))
            detail = {k: getattr(args, k) for k in _ARG_DETAIL if getattr(args, k, None)}
            record: OperatorAct | None = None
            try:
                record = _begin(config_of, args, name, detail)
            except UnrecordedActError as exc:
                if not purge:
                    return _fail(str(exc))
            except GateError as exc:
                # no configuration: install writes one; uninstall has nothing to record in
                if name not in ("install", "uninstall"):
                    return _fail(str(exc))
            status = command(args)
            if record is None and name == "install" and status == 0:
                try:
                    record = _begin(config_of, args, name, detail, after=True)
                except GateError as exc:
                    return _fail(
                        "install was done, but it could not be recorded in the audit log "
                        f"({exc.reason or exc.message})"
                    )
            if record is None or purge:  # purge: the log is gone, on purpose
                return status
            try:
                record.finish(ok=status == 0, code=f"exit-{status}")
            except GateError as exc:
                return _fail(
                    f"{name} was done, but its outcome could not be recorded in the audit log "
                    f"({exc.reason or exc.message}); check it with `qubes-mcp-admin audit verify`"
                )
            return status

        return run

    return decorate


def _begin(
    config_of: Callable[[argparse.Namespace], GateConfig],
    args: argparse.Namespace,
    act: str,
    detail: Mapping[str, object],
    *,
    after: bool = False,
) -> OperatorAct | None:
    """Load the configuration and write the pending line; ``None`` for an install that will
    start the chain itself (its record is then written afterwards, with ``after``)."""
    config = config_of(args)
    path = config.paths.audit_log
    if act == "install" and not after and not chain_exists(path):
        return None
    record = OperatorAct(
        path,
        act,
        str(getattr(args, "qube", "") or ""),
        detail,
        claimed_sudo_uid=sudo_uid(),
    )
    record.begin()
    return record


def _fail(message: str) -> int:
    print(f"qubes-mcp-admin: error: {message}", file=sys.stderr)
    return 1
