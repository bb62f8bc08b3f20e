"""Saving and loading the whole qubesd state (the emulated ``qubes.xml``).

The file is JSON at ``SimPaths.state_file``. A save is validate → temp file in the same
directory → fsync → rename → fsync of the directory, so a crash leaves either the old or the
new state, never a torn one. Power state is not saved: a load is a reboot (everything
Halted, dom0 Running).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.devices import BlockDevices
from qubes_mcp.sim.firewall import Firewall
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import names
from qubes_mcp.sim.qubesd.app import Pool, QubesApp
from qubes_mcp.sim.qubesd.props import CLASS_INDEX
from qubes_mcp.sim.qubesd.vm import Label, Qube, Volume
from qubes_mcp.sim.usb_devices import UsbDevices

FORMAT_VERSION = 1
#: A state file larger than this is refused rather than parsed.
MAX_STATE_BYTES = 64 * 1024 * 1024


class StateFileError(Exception):
    """The state file is missing, unreadable or not in the expected shape."""


def to_json(app: QubesApp) -> dict[str, Any]:
    return {
        "version": FORMAT_VERSION,
        "props": app.props,
        "labels": [[lb.index, lb.color, lb.name] for lb in app.labels.values()],
        "pools": [pool.__dict__ for pool in app.pools.values()],
        "domains": [vm.to_json() for vm in app.domains.values()],
        "devices": {k: v for k, v in app.devices.to_json().items() if k != "attached"},
        "usb_devices": app.usb_devices.to_json(),
    }


def from_json(paths: SimPaths, data: dict[str, Any]) -> QubesApp:
    if data.get("version") != FORMAT_VERSION:
        raise StateFileError(f"unsupported state version {data.get('version')!r}")
    app = QubesApp(paths=paths)
    app.props = dict(data["props"])
    app.labels = {int(i): Label(int(i), str(c), str(n)) for i, c, n in data["labels"]}
    app.pools = {p["name"]: Pool(**p) for p in data["pools"]}
    for raw in data["domains"]:
        vm = Qube(app, str(raw["klass"]), dict(raw["props"]))
        if vm.klass not in CLASS_INDEX:
            raise StateFileError(f"unknown qube class {vm.klass!r}")
        if vm.klass != "AdminVM":
            # names become paths (private volumes): never trust the file blindly
            names.validate_name(vm.name)
        vm.tags = dict.fromkeys(raw["tags"])
        vm.features = {str(k): str(v) for k, v in raw["features"].items()}
        vm.volumes = {n: Volume(**v) for n, v in raw["volumes"].items()}
        vm.notes = str(raw.get("notes", ""))
        vm.firewall = Firewall.from_json(raw.get("firewall", ["action=accept"]))
        app.domains[vm.name] = vm
    # attachments are running state: a load is a reboot; exposed devices and assignments stay
    devices = data.get("devices", {})
    app.devices = BlockDevices.from_json(
        {"exposed": devices.get("exposed", {}), "assigned": devices.get("assigned", [])}, app
    )
    app.usb_devices = UsbDevices.from_json(data.get("usb_devices", {}), app)
    return app


def save(app: QubesApp) -> None:
    """Atomically replace the state file with the current state."""
    blob = json.dumps(to_json(app), indent=1, sort_keys=True).encode()
    json.loads(blob)  # validate: what we write must read back
    target = app.paths.state_file
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".qubes.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(paths: SimPaths) -> QubesApp:
    """Read the state file written by :func:`save`."""
    try:
        with paths.state_file.open("rb") as f:
            blob = f.read(MAX_STATE_BYTES + 1)
    except OSError as err:
        raise StateFileError(f"cannot read {paths.state_file}: {err}") from err
    if len(blob) > MAX_STATE_BYTES:
        raise StateFileError("state file too large")
    try:
        return from_json(paths, json.loads(blob))
    except (ValueError, KeyError, TypeError, exc.QubesException) as err:
        raise StateFileError(f"malformed state file: {err}") from err
