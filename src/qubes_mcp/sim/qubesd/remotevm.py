"""What a RemoteVM (R4.3 ``qubes/vm/remotevm.py``: a qube on another host, reached through
a relay qube) does where a local qube would act.

A RemoteVM is a ``BaseVM``, not a ``QubesVM``: it is always "Running", its ``start``,
``suspend`` and ``kill`` refuse, ``shutdown`` takes no arguments (the Admin API passes some:
TypeError), and it has no ``pause``/``unpause``/``resume``, volumes, firewall, notes, denied
device list, libvirt domain or device collection — each a refusal the Admin API handler
does not catch (an empty reply), except devices, which it refuses with a message.
"""

from __future__ import annotations

from collections.abc import Callable

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd.vm import Qube

_REFUSALS: dict[str, Callable[[str], exc.QubesException]] = {
    "start": lambda name: exc.QubesVMNotHaltedError(name, "Cannot start a RemoteVM."),
    "suspend": lambda name: exc.QubesVMError(name, "Cannot suspend a RemoteVM."),
    "kill": lambda name: exc.QubesVMError(name, "Cannot kill a RemoteVM."),
}


def refuse(vm: Qube, action: str) -> None:
    """Raise what R4.3 raises when ``action`` is asked of ``vm`` if it is a RemoteVM.

    ``action`` is a method (``start``, ``shutdown``, ``pause``, …), an attribute
    (``volumes``, ``firewall``, ``devices_denied``, ``libvirt_domain``, ``get_notes``), or
    ``devices`` (a device write)."""
    if vm.klass != "RemoteVM":
        return
    if action in _REFUSALS:
        raise _REFUSALS[action](vm.name)
    if action == "shutdown":
        raise TypeError("RemoteVM.shutdown() got an unexpected keyword argument 'force'")
    if action == "devices":
        raise exc.QubesException("This qube doesn't support devices")
    raise AttributeError(f"'RemoteVM' object has no attribute {action!r}")
