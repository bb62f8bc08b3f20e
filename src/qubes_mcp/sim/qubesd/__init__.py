"""The emulated qubesd: Admin API and internal API over Unix sockets, R4.3 wire format.

Public API::

    app = QubesApp.new(paths)            # or load_fleet(...) / open_app(...) in sim.fleet
    server = await start_qubesd(app, paths)
    ...
    await server.close()

See ``docs/emulator-qubesd.md``.
"""

from __future__ import annotations

from pathlib import Path

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd.app import Pool, QubesApp, Request
from qubes_mcp.sim.qubesd.server import QubesdServer, start_qubesd
from qubes_mcp.sim.qubesd.vm import Label, Qube, Volume


def open_app(paths: SimPaths, fleet: Path | None) -> QubesApp:
    """The saved state under ``paths`` if there is one, else ``fleet`` (None: the demo).

    Defined here for the emulator's convenience; the implementation is
    :func:`qubes_mcp.sim.fleet.open_app` (imported late: fleet imports this package).
    """
    from qubes_mcp.sim.fleet import open_app as _open_app

    return _open_app(paths, fleet)


__all__ = [
    "Label",
    "Pool",
    "Qube",
    "QubesApp",
    "QubesdServer",
    "Request",
    "Volume",
    "open_app",
    "start_qubesd",
]
