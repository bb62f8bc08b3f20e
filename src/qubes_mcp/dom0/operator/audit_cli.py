"""The operator's repairs of the audit log: the export checkpoint and crash recovery.

The export checkpoint says which records are safely off the machine.

Rotation bounds the disk the log uses by deleting the oldest rotated files. Deleting a
record nobody has copied would let a flood of refusals wash evidence away while ``verify``
still passes, so rotation deletes only files whose every record is at or before the export
checkpoint (``audit.log.exported``), and otherwise the log refuses new requests (the gate
answers ``unavailable``) until the operator has backed the log up and said so here::

    qubes-mcp-admin audit checkpoint [--log PATH] [--through SEQ:HASH] [--reason TEXT]

Without ``--through`` the checkpoint is the head of the log as verified now: back up first,
then run it (records appended between the copy and the command are then wrongly counted as
exported; pass the ``checkpoint:`` line of a ``verify`` run just before the copy to be exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from qubes_mcp.dom0.audit.files import AuditError
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.audit.verify import verify_log


def audit_checkpoint_main(
    path: Path, out: TextIO, *, through: tuple[int, str] | None = None, reason: str = ""
) -> int:
    """``qubes-mcp-admin audit checkpoint``.

    Returns:
        0 when the checkpoint is recorded; 1 when the log is broken or ``through`` is not a
        record of its retained chain (nothing changed); 2 when there is no log.
    """
    result = verify_log(path, checkpoint=through)
    if not result.ok or result.anchor is None:
        print(f"audit checkpoint refused ({result.kind}): {result.error}", file=out)
        return 2 if result.kind in {"missing", "unreadable"} else 1
    seq, digest = through or (result.anchor.seq, result.anchor.hash)
    try:
        record = AuditLog(path, create=False).checkpoint(seq=seq, digest=digest, reason=reason)
    except AuditError as err:
        print(f"audit checkpoint refused: {err.reason}", file=out)
        return 1
    print(
        f"audit log exported through seq {seq}: rotation may now delete files holding only "
        f"records up to it; recorded as seq {record.seq}",
        file=out,
    )
    print(f"checkpoint: {seq}:{digest}", file=out)
    return 0


def audit_recover_main(
    path: Path, out: TextIO, *, reason: str = "", accept_loss: bool = False
) -> int:
    """``qubes-mcp-admin audit recover [--log PATH] [--reason TEXT] [--accept-loss]``.

    Returns:
        0 when a crash signature was repaired and the repair recorded; 1 when the log's end
        shows no crash signature (nothing changed; run ``audit verify`` and investigate).
    """
    try:
        record = AuditLog(path, create=False).recover(reason=reason, accept_loss=accept_loss)
    except AuditError as err:
        print(f"audit recover refused: {err.reason}", file=out)
        return 1
    detail = record.detail
    print(
        f"audit log recovered: moved aside {detail.get('torn_bytes', 0)} torn bytes, "
        f"anchored {detail.get('anchor_lag', 0)} record(s); recorded as seq {record.seq}",
        file=out,
    )
    if "lost_seq" in detail:
        print(
            f"record seq {detail['lost_seq']} (hash {detail['lost_hash']}) was lost; "
            "the recover record names it",
            file=out,
        )
    return 0
