"""One emulated dom0: qubesd, the qrexec router and the stock policy, under one root directory.

``run_emulator`` is what ``qubes-mcp sim run`` does: reap the qube sandboxes a killed
previous run left behind, load the saved state (or the fleet on a fresh root), install the
stock-like default policy and the dom0 service links and tools, start the hypervisor (one
sandbox per running qube), qubesd and the router, start the qubes marked ``autostart``
(through the Admin API, as qubesd does at boot), then write ``ROOT/run/emulator.ready`` so
scripts and tests can wait for it. However it stops (SIGTERM, SIGINT, its parent dying), every
qube's sandbox stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from qubes_mcp.sim.paths import SimPaths

log = logging.getLogger("qubes_mcp.sim")


def ready_file(paths: SimPaths) -> Path:
    """Exists (and holds the emulator's pid) while the emulator serves requests."""
    return paths.run / "emulator.ready"


async def _autostart(paths: SimPaths) -> None:
    from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient, QubesdError

    client = QubesdClient(paths)
    names = [
        line.split(" ", 1)[0]
        for line in (await client.call("dom0", "admin.vm.List")).decode().splitlines()
    ]
    for name in names:
        if name == "dom0":
            continue
        value = (await client.call(name, "admin.vm.property.Get", "autostart")).decode()
        if value.endswith(" True"):
            try:
                await client.call(name, "admin.vm.Start")
            except QubesdError as exc:  # a real dom0 boots the others all the same
                log.error("autostart of %s failed: %s", name, exc)


async def run_emulator(root: Path, fleet: Path | None, stop: asyncio.Event) -> None:
    """Serve an emulated dom0 under ``root`` until ``stop`` is set."""
    from qubes_mcp.sim.dom0_tools.qrexec_client import install as install_qrexec_client
    from qubes_mcp.sim.dom0_tools.qvm_run import install as install_qvm_run
    from qubes_mcp.sim.machine import Hypervisor
    from qubes_mcp.sim.qrexec import install_default_policy, install_dom0_rpc, start_router
    from qubes_mcp.sim.qrexec.operator import DenyAllOperator
    from qubes_mcp.sim.qubesd import lifecycle, open_app, start_qubesd
    from qubes_mcp.sim.sandbox import BwrapUnavailableError, bwrap_path

    paths = SimPaths(root.resolve())
    for directory in (paths.run, paths.log_dir, paths.state_file.parent):
        directory.mkdir(parents=True, exist_ok=True)
    ready = ready_file(paths)
    ready.unlink(missing_ok=True)

    for directory in paths.policy_dirs:  # both must exist, or qrexec denies everything
        directory.mkdir(parents=True, exist_ok=True)
    install_default_policy(paths)
    install_dom0_rpc(paths)
    install_qvm_run(paths)
    install_qrexec_client(paths)
    app = open_app(paths, fleet)
    hypervisor = Hypervisor(paths, on_death=lambda name: lifecycle.machine_died(app, name))
    hypervisor.reap_leftovers()
    try:
        bwrap_path()
        app.hypervisor = hypervisor
    except BwrapUnavailableError as exc:
        # qubes then run in no sandbox at all: power is state only and calls into them are
        # refused; nothing ever runs on the host instead
        log.warning("%s: qubes get no sandboxes", exc)
    qubesd = await start_qubesd(app, paths)
    router = await start_router(paths, DenyAllOperator())
    try:
        await _autostart(paths)
        ready.write_text(f"{os.getpid()}\n", encoding="ascii")
        log.info("emulated dom0 ready under %s", paths.root)
        await stop.wait()
    finally:
        ready.unlink(missing_ok=True)
        await router.close()
        await hypervisor.close()
        await qubesd.close()


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Stop when the process that started us is gone (we were re-parented), so an emulator
    whose owner crashed does not keep its qubes' sandboxes running. Polled rather than
    ``PR_SET_PDEATHSIG``, which fires when the parent *thread* ends, not the process."""
    while os.getppid() == parent:
        await asyncio.sleep(0.5)
    log.warning("the process that started the emulator is gone: stopping")
    stop.set()


def main_run(root: Path, fleet: Path | None) -> int:
    """Foreground entry point: serve until SIGINT or SIGTERM, or until our parent dies."""
    parent = os.getppid()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(_watch_parent(parent, stop))
        try:
            await run_emulator(root, fleet, stop)
        finally:
            watcher.cancel()

    asyncio.run(runner())
    return 0
