"""``admin.Events`` and the internal API's ``internal.GetSystemInfo``.

An events stream starts with ``connection-established`` and then carries every event the bus
fires, pre-events included, until the client goes away (R4.3 ``QubesMgmtEventsDispatcher``).
With dest dom0 it carries app events and the events of every qube (qubes added later
included, deleted ones no more); with a qube as dest only that qube's events.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from qubes_mcp.sim.qubesd.api import Call, method
from qubes_mcp.sim.qubesd.vm import Qube

SUPPRESSED_PREFIXES = (
    "admin-permission:",
    "device-get:",
    "device-list:",
    "device-list-attached:",
)
SUPPRESSED = frozenset({"domain-is-fully-usable"})


@method("admin.Events", no_payload=True)
async def events(call: Call) -> None:
    call.enforce(not call.arg)
    call.cancellable = True
    filters = call.permission()
    send = call.send_event
    assert send is not None
    app = call.app
    everything = call.dest.name == "dom0"
    dest = call.dest

    def dispatch(subject: Any, event: str, kw: dict[str, object]) -> None:
        if isinstance(subject, Qube):
            if not everything and subject is not dest:
                return
            if subject.name not in app.domains or app.domains[subject.name] is not subject:
                return  # not (or no longer) in the collection: no handler registered
            if event.startswith(SUPPRESSED_PREFIXES) or event in SUPPRESSED:
                return
        elif not everything:
            return
        if all(f((subject, event, kw)) for f in filters):
            send(subject, event, kw)

    wait_for_cancel: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    app.bus.subscribers.append(dispatch)
    try:
        send(None, "connection-established", {})
        await wait_for_cancel
    except asyncio.CancelledError:
        pass
    finally:
        app.bus.subscribers.remove(dispatch)


@method("internal.GetSystemInfo", no_payload=True, api="internal")
async def get_system_info(call: Call) -> str:
    call.enforce(call.dest.name == "dom0")
    call.enforce(not call.arg)
    return json.dumps(call.app.system_info())
