"""The emulated qubesd's event bus.

qubesd's ``Emitter.fire_event`` calls instance handlers first for pre-events and last for
post-events (``qubes/events.py``: the MRO is reversed for post-events). ``admin.Events``
streams are instance handlers, so a stream sees a pre-event before any reaction to it, and a
post-event after the reactions it caused (``property-set:provides_network`` arrives after the
``servicevm`` feature it set). :meth:`EventBus.fire` keeps that order: ``hooks`` are the
class-level reactions, ``subscribers`` the streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: (subject or None for the app, event name, kwargs) -> None
Subscriber = Callable[[Any, str, dict[str, object]], None]


@dataclass
class EventBus:
    """Synchronous fan-out of events to hooks (reactions) and subscribers (streams)."""

    hooks: list[Subscriber] = field(default_factory=list)
    subscribers: list[Subscriber] = field(default_factory=list)

    def emit(
        self, subject: Any, event: str, kwargs: dict[str, object], *, pre: bool = False
    ) -> None:
        """Deliver one event; a hook may raise to veto a pre-event."""
        streams = list(self.subscribers)
        if pre:
            for sub in streams:
                sub(subject, event, kwargs)
            for hook in list(self.hooks):
                hook(subject, event, kwargs)
        else:
            for hook in list(self.hooks):
                hook(subject, event, kwargs)
            for sub in streams:
                sub(subject, event, kwargs)


def wire_value(value: object) -> str:
    """``str(v)`` as qubesd puts kwargs on the wire: a qube by name, ``None`` as ``None``."""
    name = getattr(value, "name", None)
    if isinstance(name, str) and not isinstance(value, str):
        return name
    return str(value)
