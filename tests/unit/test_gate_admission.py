"""Each calling qube's share of the gate daemon, the anonymous pool, and hang-up detection.

The end-to-end proof (floods against the real daemon) is tests/integration/test_gate_fairness.py;
these pin the rules themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from qubes_mcp.dom0 import admission
from qubes_mcp.dom0.admission import ANONYMOUS_HARD_MAX, OTHER_OPEN_MAX, Admission
from qubes_mcp.dom0.errors import CODES, BusyError
from qubes_mcp.dom0.hangup import HangupWatcher, hung_up


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_busy_is_a_code_the_agent_can_receive() -> None:
    assert "busy" in CODES
    assert BusyError().to_reply()["error"] == {
        "code": "busy",
        "message": "too many requests from this qube at once; try again shortly",
    }


def test_a_full_share_refuses_busy_and_frees_its_places() -> None:
    shares = Admission(["a", "b"], open_max=3, acting_max=1)
    with contextlib.ExitStack() as held:
        for _ in range(3):
            held.enter_context(shares.share("a").hold())
        with pytest.raises(BusyError), shares.share("a").hold():
            pass
        # another principal's share is untouched by the first one's
        with shares.share("b").hold():
            pass
    with shares.share("a").hold():  # places come back when requests end
        pass


def test_sources_that_are_not_principals_share_one_small_share() -> None:
    shares = Admission(["a"], open_max=64, acting_max=16)
    assert shares.share("stranger") is shares.share("another")
    assert shares.share("stranger") is not shares.share("a")
    with contextlib.ExitStack() as held:
        for _ in range(OTHER_OPEN_MAX):
            held.enter_context(shares.share("stranger").hold())
        with pytest.raises(BusyError), shares.share("another").hold():
            pass
        with shares.share("a").hold():
            pass


def test_the_bound_is_the_anonymous_pool_plus_every_share() -> None:
    shares = Admission(["a", "b", "c"], open_max=10, acting_max=2)
    assert shares.bound == ANONYMOUS_HARD_MAX + 3 * 10 + OTHER_OPEN_MAX


def test_a_full_anonymous_pool_drops_its_oldest_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission, "ANONYMOUS_MAX", 3)
    monkeypatch.setattr(admission, "NAME_GRACE", 0.0)
    shares = Admission(["a"], open_max=4, acting_max=1)
    transports = [FakeTransport() for _ in range(5)]
    with contextlib.ExitStack() as held:
        for t in transports:
            held.enter_context(shares.anonymous(t))  # type: ignore[arg-type]
        assert [t.aborted for t in transports] == [True, True, False, False, False]
        assert shares.evicted == 2


def test_a_connection_within_its_grace_is_not_dropped_for_a_newcomer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst accepted at once cannot push out a real request before its first read: the
    newcomers wait over the soft bound, and only beyond the hard bound is the newest dropped."""
    monkeypatch.setattr(admission, "ANONYMOUS_MAX", 2)
    monkeypatch.setattr(admission, "ANONYMOUS_HARD_MAX", 4)
    monkeypatch.setattr(admission, "NAME_GRACE", 60.0)
    shares = Admission(["a"], open_max=4, acting_max=1)
    transports = [FakeTransport() for _ in range(4)]
    with contextlib.ExitStack() as held:
        for t in transports:
            held.enter_context(shares.anonymous(t))  # type: ignore[arg-type]
        newest = FakeTransport()
        with pytest.raises(ConnectionAbortedError), shares.anonymous(newest):  # type: ignore[arg-type]
            pass
        assert not any(t.aborted for t in transports) and newest.aborted


def test_a_connection_that_named_itself_leaves_the_anonymous_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission, "ANONYMOUS_MAX", 2)
    shares = Admission(["a"], open_max=4, acting_max=1)
    first, second, third = FakeTransport(), FakeTransport(), FakeTransport()
    with shares.anonymous(first):  # type: ignore[arg-type]
        pass
    with shares.anonymous(second), shares.anonymous(third):  # type: ignore[arg-type]
        assert not first.aborted and not second.aborted


# --- hang-ups ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "gone"),
    [
        ("nothing", False),
        ("end of input (half-close)", False),
        ("full close", True),
        ("end of input, then close", True),
        ("shutdown both directions", True),
    ],
)
def test_only_a_full_close_is_a_hang_up(how: str, gone: bool) -> None:
    caller, gate = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with gate:
        caller.sendall(b"payload")
        if how == "end of input (half-close)":
            caller.shutdown(socket.SHUT_WR)
        elif how == "full close":
            caller.close()
        elif how == "end of input, then close":
            caller.shutdown(socket.SHUT_WR)
            caller.close()
        elif how == "shutdown both directions":
            caller.shutdown(socket.SHUT_RDWR)
        gate.recv(100)
        assert hung_up(gate.fileno()) is gone
        caller.close()


def test_the_watcher_sets_the_event_of_the_caller_that_hangs_up() -> None:
    async def main() -> None:
        watcher = HangupWatcher(interval=0.01)
        stay, stay_gate = socket.socketpair()
        leave, leave_gate = socket.socketpair()
        stay.shutdown(socket.SHUT_WR)  # waits for its answer
        with (
            watcher.watch(stay_gate.fileno()) as stays,
            watcher.watch(leave_gate.fileno()) as leaves,
        ):
            await asyncio.sleep(0.05)
            assert not stays.is_set() and not leaves.is_set()
            leave.close()
            await asyncio.wait_for(leaves.wait(), 5)
            assert not stays.is_set()
        await watcher.close()
        for s in (stay, stay_gate, leave_gate):
            s.close()

    asyncio.run(main())


def test_a_caller_already_gone_is_noticed_at_once() -> None:
    async def main() -> None:
        watcher = HangupWatcher(interval=60)
        caller, gate = socket.socketpair()
        caller.close()
        with watcher.watch(gate.fileno()) as gone:
            assert gone.is_set()
        await watcher.close()
        gate.close()

    asyncio.run(main())
