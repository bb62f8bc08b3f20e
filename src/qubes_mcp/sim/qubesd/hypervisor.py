"""What qubesd's power operations act on: the emulator's hypervisor (the sandboxes).

qubesd holds one when the emulator runs (:class:`qubes_mcp.sim.machine.Hypervisor`); without
one (unit tests of the Admin API) power is state only, as before the sandboxes lived long.
"""

from __future__ import annotations

from typing import Protocol


class PowerHooks(Protocol):
    """A real domain's life: each call returns once the sandbox is in that state."""

    async def start(self, name: str) -> None: ...

    async def shutdown(self, name: str) -> None: ...

    async def kill(self, name: str) -> None: ...

    async def pause(self, name: str) -> None: ...

    async def unpause(self, name: str) -> None: ...
