"""``admin.vm.Stats`` and ``admin.vm.Console`` (R4.3 ``qubes/api/admin.py``).

``admin.vm.Stats`` is a stream like ``admin.Events``: ``connection-established``, then every
``stats_interval`` seconds one ``vm-stats`` event per running qube (dom0 included) with
``memory_kb``, ``cpu_time`` (ms), ``cpu_usage`` and ``cpu_usage_raw`` (%, the first divided
by the vcpus), as ``Host.get_vm_stats`` computes them from two samples. The figures come
from :mod:`.stats`: the sandbox's processes when the emulator knows its pid, else a stub.

``admin.vm.Console`` answers the console tty from the libvirt domain XML; a halted qube is
refused, and an emulated qube has no tty, so a running one answers an empty path.
"""

from __future__ import annotations

import asyncio
import time

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import remotevm, stats
from qubes_mcp.sim.qubesd.api import Call, method
from qubes_mcp.sim.qubesd.vm import Qube


@method("admin.vm.Console", no_payload=True)
async def vm_console(call: Call) -> str:
    call.enforce(not call.arg)
    call.permission()
    if not call.dest.is_running():
        raise exc.QubesVMNotRunningError(call.dest.name)
    remotevm.refuse(call.dest, "libvirt_domain")
    return ""  # no <console tty=…> in an emulated qube's domain


@method("admin.vm.Stats", no_payload=True)
async def vm_stats(call: Call) -> None:
    call.enforce(not call.arg)
    call.cancellable = True
    call.permission()
    send = call.send_event
    assert send is not None
    only: Qube | None = None if call.dest.name == "dom0" else call.dest
    send(None, "connection-established", {})
    previous: dict[str, stats.Sample] = {}
    previous_time: float | None = None
    try:
        while True:
            now = time.monotonic()
            current: dict[str, stats.Sample] = {}
            for vm in list(call.app.domains.values()):
                if (only is not None and vm is not only) or not vm.is_running():
                    continue
                if vm.klass == "RemoteVM":  # not a libvirt domain: no figures
                    continue
                sample = stats.sample(call.app, vm)
                current[vm.name] = sample
                raw = stats.cpu_usage_raw(previous.get(vm.name), sample, previous_time, now)
                send(
                    vm,
                    "vm-stats",
                    {
                        "memory_kb": sample.memory_kb,
                        "cpu_time": sample.cpu_time_ns // 1_000_000,
                        "cpu_usage": round(raw / max(sample.vcpus, 1)),
                        "cpu_usage_raw": raw,
                    },
                )
            previous, previous_time = current, now
            await asyncio.sleep(max(int(str(call.app.get("stats_interval"))), 1))
    except asyncio.CancelledError:
        pass
