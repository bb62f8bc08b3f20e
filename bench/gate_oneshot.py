"""The gate as a fresh Python process per call: the prior art's model, for comparison only.

``python -m bench.gate_oneshot --config FILE`` reads ONE qrexec socket-service request from
stdin (``qmcp.Op+ARG SOURCE name|keyword TARGET\\0`` + JSON payload, then EOF), and does what
an executable qrexec service written in Python would do for it: start an interpreter, import
the gate, load and validate the configuration, open the audit log, build ``Gate``, handle the
request (fresh qubesd reads, decision, action, audit), print the one JSON reply, exit.

This is the same code the daemon runs per request (``Gate.handle``); the difference measured
by ``bench_gate`` is only the per-call process start, imports and configuration load that the
daemon pays once. Not installed anywhere; never used outside the benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import load_config
from qubes_mcp.dom0.consent import ConsentBroker, desktop_notifier
from qubes_mcp.dom0.daemon import parse_descriptor
from qubes_mcp.dom0.errors import GateError, InvalidInputError
from qubes_mcp.dom0.gate import Gate, Request

_DESCRIPTOR_MAX = 1024


async def handle_one(config_path: Path, raw: bytes) -> dict[str, Any]:
    config = load_config(config_path)
    cap = config.limits.request_bytes
    descriptor, nul, untrusted_payload = raw.partition(b"\0")
    try:
        if not nul or len(descriptor) > _DESCRIPTOR_MAX:
            raise InvalidInputError("no qrexec descriptor")
        if len(untrusted_payload) > cap:
            raise InvalidInputError(f"request is larger than {cap} bytes")
        service, source, target = parse_descriptor(descriptor)
    except GateError as exc:
        return exc.to_reply()
    consent = ConsentBroker(config.consent.timeout, desktop_notifier)
    with AuditLog(config.paths.audit_log, create=False) as audit:
        gate = Gate(config, audit, consent)
        return await gate.handle(Request(service, source, target, untrusted_payload))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    # one byte past the largest legal request, so an oversized one is seen and refused
    raw = sys.stdin.buffer.read(_DESCRIPTOR_MAX + (64 << 20) + 1)
    reply = asyncio.run(handle_one(args.config, raw))
    sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
