"""Limits of one qrexec router (real qrexec has none of these timeouts; see the docs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    """Limits of one router."""

    request_timeout: float = 10.0  # for the REQUEST frame to arrive
    call_timeout: float = 600.0  # a call running longer is killed
    drain_timeout: float = 5.0  # reading what the caller still sends after EXIT
    max_calls_per_source: int = 64  # concurrent calls one qube may have in flight
