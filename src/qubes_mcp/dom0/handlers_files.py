"""Binary files in and out of a qube: ``file.read`` and ``file.write``.

Both run one fixed ``sh -c`` script in the qube through dom0's line (``handlers_write.relay``);
the path and numbers are its positional arguments (``$1``…), never spliced into the script, so
nothing the agent sends becomes shell syntax. The bytes travel as base64
in the JSON reply and request; the audit log records the path (escaped and capped by the log),
the size and the SHA-256 of the bytes, never the bytes.

Reads are bounded by the gate's output cap (``[limits] output_bytes``); writes by the request
size (``[limits] request_bytes``): larger files are written in pieces with ``mode="append"``.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.errors import InvalidInputError
from qubes_mcp.dom0.handlers_write import relay

#: the file's size on the first line, then exactly the requested range of its bytes
_READ = (
    'size=$(stat -L -c %s -- "$1") || exit 3; printf "%s\\n" "$size"; '
    'exec dd if="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" bs=65536 status=none'
)
_WRITE = {
    "create": 'set -C; exec cat > "$1"',
    "overwrite": 'exec cat > "$1"',
    "append": 'exec cat >> "$1"',
}
#: stderr lines the agent sees when the program in the qube fails (its own qube's words)
_REASON_CHARS = 200


def _failure(action: str, stderr: bytes) -> InvalidInputError:
    reason = stderr.decode("utf-8", "replace").strip().splitlines()
    said = reason[-1][:_REASON_CHARS] if reason else "no reason given"
    return InvalidInputError(f"cannot {action} the file in the qube: {said}")


async def file_read(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    path, offset = a["path"], a["offset"]
    cap = ctx.config.limits.output_bytes
    length = min(a["length"], cap - 32)  # room for the size line
    ctx.detail.update(path=path, size=length)
    result = await relay(
        ctx,
        ctx.target,
        ["sh", "-c", _READ, "sh", path, str(offset), str(length)],
        b"",
        ctx.config.limits.run_timeout,
    )
    if result.exit_code != 0 or b"\n" not in result.stdout:
        raise _failure("read", result.stderr)
    head, _, data = result.stdout.partition(b"\n")
    digest = hashlib.sha256(data).hexdigest()
    ctx.detail.update(bytes=len(data), data_sha256=digest)
    file_size = int(head) if head.isdigit() else None
    return {
        "qube": ctx.target,
        "path": path,
        "offset": offset,
        "length": len(data),
        "file_size": file_size,
        "eof": file_size is not None and offset + len(data) >= file_size,
        "sha256": digest,
        "data": base64.b64encode(data).decode("ascii"),
    }


async def file_write(ctx: Context) -> dict[str, Any]:
    a = ctx.args
    data = base64.b64decode(a["data"])
    digest = hashlib.sha256(data).hexdigest()
    ctx.detail.update(path=a["path"], bytes=len(data), data_sha256=digest)
    result = await relay(
        ctx,
        ctx.target,
        ["sh", "-c", _WRITE[a["mode"]], "sh", a["path"]],
        data,
        ctx.config.limits.run_timeout,
    )
    if result.exit_code != 0:
        raise _failure("write", result.stderr)
    return {
        "qube": ctx.target,
        "path": a["path"],
        "mode": a["mode"],
        "written": len(data),
        "sha256": digest,
    }
