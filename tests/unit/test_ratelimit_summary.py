"""Per-principal token buckets and the refusal summary, on a fake clock."""

from __future__ import annotations

import pytest

from qubes_mcp.dom0.audit.summary import MAX_KEYS, RefusalSummary, Summary
from qubes_mcp.dom0.config import Limits, parse_config
from qubes_mcp.dom0.errors import CODES, ConfigError, RateLimitedError
from qubes_mcp.dom0.ratelimit import RateLimiter, TokenBucket
from tests.gate_fixtures import CONFIG_TEXT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(rate: int = 2, burst: int = 4, refused_rate: int = 1, refused_burst: int = 3) -> Limits:
    return Limits(65536, 1 << 20, 600, 120, 16, rate, burst, refused_rate, refused_burst)


def admitted(limiter: RateLimiter, who: str, count: int) -> int:
    ok = 0
    for _ in range(count):
        try:
            limiter.admit(who)
            ok += 1
        except RateLimitedError:
            pass
    return ok


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(limits(), clock)
    assert admitted(limiter, "a", 10) == 4  # the burst
    clock.now += 1.0
    assert admitted(limiter, "a", 10) == 2  # one second of rate
    clock.now += 100.0
    assert admitted(limiter, "a", 10) == 4  # never more than the burst saved up


def test_principals_have_their_own_buckets() -> None:
    limiter = RateLimiter(limits(), Clock())
    assert admitted(limiter, "a", 10) == 4
    assert admitted(limiter, "b", 10) == 4


def test_refusals_spend_their_own_budget_and_then_limit_everything() -> None:
    clock = Clock()
    limiter = RateLimiter(limits(rate=1000, burst=1000), clock)
    for _ in range(3):
        limiter.admit("a")
        limiter.refused("a")
    with pytest.raises(RateLimitedError) as info:
        limiter.admit("a")  # even a request that would succeed
    assert "refusals" in info.value.reason
    assert admitted(limiter, "b", 5) == 5
    clock.now += 1.0  # refused_rate = 1/s
    assert admitted(limiter, "a", 1) == 1


def test_a_token_bucket_refills_continuously() -> None:
    bucket = TokenBucket(rate=10, burst=1, tokens=0, stamp=0.0)
    assert not bucket.take(0.05)
    assert bucket.take(0.1)


def test_rate_limited_is_a_stable_code_with_a_fixed_message() -> None:
    assert "rate-limited" in CODES
    reply = RateLimitedError(reason="x is over 20 requests/s").to_reply()
    assert reply == {
        "ok": False,
        "error": {"code": "rate-limited", "message": "too many requests; try again later"},
    }


def test_the_limits_are_configurable_and_checked() -> None:
    config = parse_config(CONFIG_TEXT + "\n[limits]\nrate = 7\nburst = 9\n")
    assert (config.limits.rate, config.limits.burst) == (7, 9)
    assert (config.limits.refused_rate, config.limits.refused_burst) == (5, 50)  # defaults
    with pytest.raises(ConfigError, match=r"limits\.rate"):
        parse_config(CONFIG_TEXT + "\n[limits]\nrate = 0\n")
    with pytest.raises(ConfigError, match=r"limits\.refused_burst"):
        parse_config(CONFIG_TEXT + '\n[limits]\nrefused_burst = "many"\n')


# --- the refusal summary -------------------------------------------------------------------


def test_the_first_refusals_are_recorded_in_full_and_the_rest_counted() -> None:
    clock = Clock()
    summary = RefusalSummary(window=10, full=2, clock=clock)
    key = ("p", "qube.start", "not-found")
    assert [summary.first(key) for _ in range(5)] == [True, True, False, False, False]
    assert summary.due() == []  # the window is still open
    assert summary.pending == 3
    clock.now += 10
    assert summary.due() == [Summary(key, 3)]
    assert summary.pending == 0
    assert summary.first(key) is True  # a new window


def test_keys_are_separate_and_bounded() -> None:
    clock = Clock()
    summary = RefusalSummary(window=10, full=1, clock=clock)
    in_full = 0
    for i in range(MAX_KEYS + 50):
        in_full += summary.first(("p", f"op{i}", "not-found"))
        in_full += summary.first(("p", f"op{i}", "not-found"))
    assert in_full == MAX_KEYS + 1  # one per key, and one for everything beyond the bound
    clock.now += 10
    due = summary.due()
    assert len(due) == MAX_KEYS + 1  # a bounded number of lines …
    assert in_full + sum(d.count for d in due) == 2 * (MAX_KEYS + 50)  # … losing nothing


def test_counts_whose_line_failed_are_restored_not_lost() -> None:
    clock = Clock()
    summary = RefusalSummary(window=10, full=0, clock=clock)
    key = ("p", "qube.kill", "not-found")
    for _ in range(4):
        summary.first(key)
    clock.now += 10
    taken = summary.due()
    summary.restore(taken)
    summary.first(key)  # more arrive meanwhile
    assert sum(d.count for d in summary.due(everything=True)) == 5
