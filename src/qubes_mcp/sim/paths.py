"""Where an emulated dom0 keeps its files under its root directory.

The layout mirrors a real dom0 so that tools written for Qubes only need a different root:
``ROOT/run/qubesd.sock`` is the Admin API socket, ``ROOT/etc/qubes/policy.d`` the qrexec
policy, ``ROOT/etc/qubes-rpc`` the dom0 services.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SimPaths:
    """All paths of one emulated dom0, derived from its root directory."""

    root: Path

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def qubesd_sock(self) -> Path:
        """Admin API socket (``/var/run/qubesd.sock`` in a real dom0)."""
        return self.run / "qubesd.sock"

    @property
    def qubesd_internal_sock(self) -> Path:
        """Internal API socket (``internal.GetSystemInfo``)."""
        return self.run / "qubesd.internal.sock"

    @property
    def router_sock(self) -> Path:
        """The qrexec router's control socket; only host-side (dom0) tools reach it."""
        return self.run / "qrexec" / "router.sock"

    @property
    def dom0_direct_sock(self) -> Path:
        """dom0's direct line to a qube, no policy (``qrexec-client -d`` in a real dom0; what
        ``qvm-run`` uses there). Host-side only, like the control socket."""
        return self.run / "qrexec" / "dom0-direct.sock"

    def vm_router_dir(self, name: str) -> Path:
        """Per-qube directory of the router's socket for that qube, bound read-only into that
        qube's sandbox (a directory, so the socket may appear after the sandbox started)."""
        return self.run / "qrexec" / "vm" / name

    def vm_agent_sock(self, name: str) -> Path:
        """Per-qube qrexec socket the qube calls out on; the router knows the caller by the
        socket it connected to, never by what the caller claims."""
        return self.vm_router_dir(name) / "agent.sock"

    def qrexec_daemon_sock(self, name: str) -> Path:
        """dom0's line into a running qube's qrexec agent (``/var/run/qubes/qrexec.NAME`` of
        a real dom0's qrexec-daemon). Created by the emulator, never visible to any qube: the
        agent inside holds the listening end it inherited."""
        return self.run / "qubes" / f"qrexec.{name}"

    @property
    def machines_dir(self) -> Path:
        """One pid file per running qube's sandbox, so a later run can reap what a killed
        emulator left behind."""
        return self.run / "qubes-sim" / "machines"

    def console_log(self, name: str) -> Path:
        """The qube's console log (``/var/log/xen/console/guest-NAME.log`` in a real dom0)."""
        return self.root / "var" / "log" / "xen" / "console" / f"guest-{name}.log"

    @property
    def policy_dirs(self) -> tuple[Path, Path]:
        """Policy directories in load order (the runtime one wins on duplicate basenames)."""
        return (self.run / "qubes" / "policy.d", self.root / "etc" / "qubes" / "policy.d")

    @property
    def rpc_dir(self) -> Path:
        """dom0 qrexec services (``/etc/qubes-rpc``)."""
        return self.root / "etc" / "qubes-rpc"

    @property
    def state_file(self) -> Path:
        """The emulated qubes.xml: the whole qubesd state, saved atomically."""
        return self.root / "var" / "lib" / "qubes" / "qubes.json"

    def qube_dir(self, name: str) -> Path:
        """Per-qube storage; its ``private`` directory is the private volume (``/rw``)."""
        return self.root / "var" / "lib" / "qubes" / "qubes" / name

    def private_dir(self, name: str) -> Path:
        return self.qube_dir(name) / "private"

    @property
    def log_dir(self) -> Path:
        return self.root / "var" / "log" / "qubes"
