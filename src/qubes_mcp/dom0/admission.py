"""Who may hold what in the gate daemon, so that no calling qube can slow another.

A connection to the gate socket goes through two stages, and each stage has its own bound:

1. **Anonymous** (accepted, service descriptor not read yet). qrexec writes the descriptor
   as soon as it connects, so a connection stays here for a moment only. Nothing here is
   anyone's: when the pool is full, the *oldest* anonymous connection is dropped to make room
   — but only one that has had :data:`NAME_GRACE` to name itself, so a burst of newcomers
   accepted together cannot push out a real request before its first read; if none is that
   old, the newcomer waits over the soft bound, up to a hard one, beyond which the newest is
   dropped. A flood of connections that never say who they are therefore displaces itself.
2. **Identified** (the descriptor names the calling qube, which qrexec vouches for). Every
   configured principal has its own :class:`Share`, and every other source shares one small
   share (qrexec's policy never lets them reach the gate; if one does, it is refused anyway).
   A share bounds the requests of its qube that are open at once (received, queued or
   acting: ``[limits] open_requests``) and those acting at once (``concurrent_requests``).
   Beyond the first bound the request is refused ``busy`` at once; it never queues.

The total is therefore bounded by construction (anonymous pool + the sum of the shares, see
:meth:`Admission.bound`), and because the shares are disjoint, one principal can exhaust only
its own: capacity for every other principal is always reserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from qubes_mcp.dom0.errors import BusyError

#: connections accepted whose service descriptor has not arrived yet: beyond this, the oldest
#: one that had its chance to name itself is dropped for each newcomer
ANONYMOUS_MAX = 1024
#: never more than this at once: the newest is dropped
ANONYMOUS_HARD_MAX = 2 * ANONYMOUS_MAX
#: seconds an anonymous connection is safe from being dropped to make room (a real request
#: is read within one turn of the event loop)
NAME_GRACE = 0.25
#: open requests of all sources that are not configured principals, together
OTHER_OPEN_MAX = 4
OTHER = "<other>"


class Slots:
    """A semaphore whose size the operator may change while it is held (a reload): waiters
    are served first come, first served; a smaller size takes effect as slots are released."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> bool:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as it was cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return True

    def release(self) -> None:
        self.used -= 1
        self._hand_on()

    def resize(self, size: int) -> None:
        self.size = size
        self._hand_on()

    def _hand_on(self) -> None:
        while self._waiters and self.used < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class Share:
    """One calling qube's part of the gate: its open requests and its acting slots."""

    def __init__(self, open_max: int, acting_max: int) -> None:
        self.open_max = open_max
        self.open = 0
        self.acting = Slots(acting_max)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One open request for as long as the block runs; ``busy`` when the share is full."""
        if self.open >= self.open_max:
            raise BusyError(reason=f"{self.open} requests open, the share is {self.open_max}")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


class Admission:
    """The anonymous pool and the per-source shares of one gate daemon."""

    def __init__(self, principals: Iterable[str], *, open_max: int, acting_max: int) -> None:
        self._shares = {p: Share(open_max, acting_max) for p in principals}
        self._other = Share(min(OTHER_OPEN_MAX, open_max), 1)
        self._anonymous: OrderedDict[asyncio.WriteTransport, float] = OrderedDict()
        #: anonymous connections dropped to make room (for the journal and the tests)
        self.evicted = 0

    def share(self, source: str) -> Share:
        return self._shares.get(source, self._other)

    def configure(self, principals: Iterable[str], *, open_max: int, acting_max: int) -> None:
        """New bounds from a reloaded configuration. A share keeps what it holds: requests in
        flight stay counted, so a smaller bound takes effect as they end; a principal no longer
        configured falls to the small share of the others."""
        shares = {}
        for principal in principals:
            share = self._shares.get(principal) or Share(open_max, acting_max)
            share.open_max = open_max
            share.acting.resize(acting_max)
            shares[principal] = share
        self._shares = shares
        self._other.open_max = min(OTHER_OPEN_MAX, open_max)

    @property
    def bound(self) -> int:
        """The most connections the daemon ever holds at once."""
        shares = [*self._shares.values(), self._other]
        return ANONYMOUS_HARD_MAX + sum(s.open_max for s in shares)

    @contextlib.contextmanager
    def anonymous(self, transport: asyncio.WriteTransport) -> Iterator[None]:
        """Hold an anonymous place while the descriptor is read; make room by dropping the
        oldest anonymous connection (its read then fails and its handler ends quietly).

        Raises:
            ConnectionAbortedError: the pool is at its hard bound; this connection is dropped.
        """
        now = time.monotonic()
        while len(self._anonymous) >= ANONYMOUS_MAX:
            oldest, since = next(iter(self._anonymous.items()))
            if now - since < NAME_GRACE:
                break
            del self._anonymous[oldest]
            oldest.abort()
            self.evicted += 1
        if len(self._anonymous) >= ANONYMOUS_HARD_MAX:
            transport.abort()
            self.evicted += 1
            raise ConnectionAbortedError("too many connections that have not named themselves")
        self._anonymous[transport] = now
        try:
            yield
        finally:
            self._anonymous.pop(transport, None)
