"""Per-principal rate limits: a token bucket for every request and one for refused requests.

Refused requests need no consent and cost the agent nothing, so without a limit one agent
could send them as fast as the gate answers: burning dom0 CPU and filling the audit log.
Each calling qube (the qrexec source, which the agent cannot choose) gets two buckets:

- ``rate``/``burst``: every request takes a token; an empty bucket refuses ``rate-limited``;
- ``refused_rate``/``refused_burst``: every refusal takes a token; while this bucket is
  empty, *every* request of that qube is ``rate-limited`` — a qube that keeps getting
  refused is slowed down as a whole, not only in what it gets wrong.

Rate-limited refusals are refusals too, so a flood keeps the refused bucket empty, and the
qube is served again ``1 / refused_rate`` seconds after it stops. Other qubes' buckets are
untouched: one agent's flood never limits another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from qubes_mcp.dom0.config import Limits
from qubes_mcp.dom0.errors import RateLimitedError

#: buckets kept at most; the sources are qube names qrexec vouched for, so this is a backstop
MAX_SOURCES: Final = 4096


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class RateLimiter:
    """The two buckets of every calling qube."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._all: dict[str, TokenBucket] = {}
        self._refused: dict[str, TokenBucket] = {}

    def configure(self, limits: Limits) -> None:
        """New rates and bursts (a reload): every bucket keeps its tokens, up to the new burst."""
        self._limits = limits
        for table, rate, burst in (
            (self._all, limits.rate, limits.burst),
            (self._refused, limits.refused_rate, limits.refused_burst),
        ):
            for bucket in table.values():
                bucket.rate, bucket.burst = rate, burst
                bucket.tokens = min(bucket.tokens, burst)

    def _bucket(
        self, table: dict[str, TokenBucket], who: str, rate: int, burst: int
    ) -> TokenBucket:
        bucket = table.get(who)
        if bucket is None:
            if len(table) >= MAX_SOURCES:
                table.clear()  # a backstop only: forgetting starts everyone full again
            bucket = table[who] = TokenBucket(rate, burst, burst, self._clock())
        return bucket

    def admit(self, who: str) -> None:
        """Let one request of ``who`` in, or refuse it.

        Raises:
            RateLimitedError: ``who`` is over its request rate, or over its refusal rate.
        """
        now = self._clock()
        lim = self._limits
        refused = self._bucket(self._refused, who, lim.refused_rate, lim.refused_burst)
        refused.refill(now)
        if refused.tokens < 1:
            raise RateLimitedError(reason=f"{who} is over {lim.refused_rate} refusals/s")
        if not self._bucket(self._all, who, lim.rate, lim.burst).take(now):
            raise RateLimitedError(reason=f"{who} is over {lim.rate} requests/s")

    def refused(self, who: str) -> None:
        """Count one refusal of ``who`` (the bucket never goes below empty)."""
        lim = self._limits
        self._bucket(self._refused, who, lim.refused_rate, lim.refused_burst).take(self._clock())
