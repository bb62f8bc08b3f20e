"""Noticing that the caller of a request has hung up, so a waiting request is withdrawn.

qrexec half-closes the gate's socket after the caller's input (the gate reads EOF) and keeps
the other direction open for the reply. When the caller goes away — the agent's client was
cancelled, the control qube died — qrexec ends the call and closes its end entirely
(``libqrexec/process_io.c``: the vchan closes, both directions are shut down, the process
exits). On a Unix stream socket that full close, unlike the half-close, raises ``POLLHUP``
(the kernel sets the peer's shutdown mask to both directions on close), and ``POLLERR`` if
the caller left the reply unread. A zero-length ``recv(MSG_PEEK)`` cannot tell the two
apart: after the half-close it already returns ``b""``.

:class:`HangupWatcher` polls the sockets of waiting requests for exactly those two events,
with no ``POLLIN`` interest (so the EOF already read does not wake it), and sets each one's
:class:`asyncio.Event` — the ``Request.hangup`` the gate checks before it acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import Iterator

#: how often waiting requests are checked (a withdrawal is noticed within this)
POLL_INTERVAL = 0.2
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def hung_up(fd: int) -> bool:
    """Whether the peer of the stream socket ``fd`` has closed its end entirely (now)."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(revents & _GONE for _, revents in poller.poll(0))


class HangupWatcher:
    """One periodic ``poll()`` over the sockets of every request that waits."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self._poller = select.poll()
        self._events: dict[int, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, fd: int) -> Iterator[asyncio.Event]:
        """An event that is set once the caller behind ``fd`` hangs up (checked at once, then
        every :attr:`interval` while the block runs)."""
        event = asyncio.Event()
        if hung_up(fd):
            event.set()
        self._events[fd] = event
        self._poller.register(fd, 0)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            yield event
        finally:
            if self._events.get(fd) is event:
                del self._events[fd]
                with contextlib.suppress(KeyError):
                    self._poller.unregister(fd)

    async def _run(self) -> None:
        while self._events:
            await asyncio.sleep(self.interval)
            for fd, revents in self._poller.poll(0):
                event = self._events.get(fd)
                if event is not None and revents & _GONE:
                    event.set()
                    # no need to hear about it again: the request is being withdrawn
                    del self._events[fd]
                    self._poller.unregister(fd)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
