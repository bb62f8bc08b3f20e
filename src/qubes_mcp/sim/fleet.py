"""Fleet files: a TOML description of an emulated Qubes machine, turned into a qubesd state.

Format (all keys optional except each qube's ``name``, ``class`` and ``label``)::

    [pool]
    size = 536870912000              # bytes of the varlibqubes pool
    driver = "file"                  # or "file-reflink" (volume paths and checks follow)

    [labels]                         # extra labels beyond the eight defaults
    teal = "0x008080"

    [global]                         # admin.property.* values, as their Set payload text
    default_template = "debian-13-xfce"
    default_netvm = "sys-firewall"

    [[qube]]
    name = "work"
    class = "AppVM"                  # AppVM | TemplateVM | StandaloneVM | DispVM
    label = "blue"
    template = "debian-13-xfce"      # AppVM/DispVM; AppVM defaults to default_template
    autostart = true                 # started by boot()
    tags = ["ai-managed"]
    properties = { netvm = "", template_for_dispvms = true }   # "" means None
    features = { "service.cups" = "1" }
    volumes = { private = 4294967296 }                          # sizes in bytes
    block_devices = [ { port = "sda", description = "Demo USB stick" } ]
    usb_devices = [ { port = "2-1", vendor_id = "0781", product_id = "5581",
                      vendor = "SanDisk Corp.", product = "Cruzer Blade", serial = "4C53" } ]

Every value goes through the same sanitising and setters as ``admin.*.Set``, so a fleet
cannot describe a state that qubesd would refuse (a netvm loop, a non-network netvm, …).
Qubes are created in file order (a template must come before the qubes based on it); VM
references in ``properties`` and ``[global]`` are applied after every qube exists.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.device_model import BlockDeviceSpec
from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import lifecycle, names, storage
from qubes_mcp.sim.qubesd import props as pdefs
from qubes_mcp.sim.qubesd.app import QubesApp
from qubes_mcp.sim.qubesd.vm import Label, Qube
from qubes_mcp.sim.usb_devices import UsbDeviceSpec

MAX_FLEET_BYTES = 1024 * 1024
KNOWN_QUBE_KEYS = frozenset(
    {
        "name",
        "class",
        "label",
        "template",
        "autostart",
        "tags",
        "properties",
        "features",
        "volumes",
        "block_devices",
        "usb_devices",
    }
)


class FleetError(Exception):
    """The fleet file is malformed or describes a state qubesd would refuse."""


def demo_fleet_text() -> str:
    return (resources.files("qubes_mcp.sim") / "data" / "fleets" / "demo.toml").read_text()


def _payload(value: object) -> bytes:
    if isinstance(value, bool):
        return b"True" if value else b"False"
    return str(value).encode()


def _set(app: QubesApp, holder: Qube | QubesApp, name: str, value: object) -> None:
    prop = holder.defs.get(name)
    if prop is None:
        raise FleetError(f"{holder.name}: no property {name!r}")
    try:
        app.set_prop(holder, name, pdefs.sanitize(prop, _payload(value)))
    except (exc.QubesException, AttributeError, ValueError) as err:
        raise FleetError(f"{holder.name}: cannot set {name}={value!r}: {err}") from err


def build(paths: SimPaths, data: dict[str, Any]) -> QubesApp:
    """Build a fresh app from parsed fleet data."""
    pool = data.get("pool", {})
    pool_driver = pool.get("driver", "file")
    if pool_driver not in storage.VARLIBQUBES_DRIVERS:
        raise FleetError(f"pool driver must be one of {storage.VARLIBQUBES_DRIVERS}")
    app = QubesApp.new(paths, pool_size=pool.get("size"), pool_driver=pool_driver)
    app.autosave = False
    for name, color in data.get("labels", {}).items():
        if not names.is_valid_label_name(name):
            raise FleetError(f"bad label name {name!r}")
        index = max(8, *app.labels) + 1
        app.labels[index] = Label(index, str(color), name)
    deferred: list[tuple[Qube, str, object]] = []
    for spec in data.get("qube", []):
        unknown = set(spec) - KNOWN_QUBE_KEYS
        if unknown:
            raise FleetError(f"qube {spec.get('name')!r}: unknown keys {sorted(unknown)}")
        vm = _create(app, spec, data.get("global", {}).get("default_template"))
        for key, value in spec.get("properties", {}).items():
            prop = vm.defs.get(key)
            if prop is not None and prop.kind == "vm":
                deferred.append((vm, key, value))
            else:
                _set(app, vm, key, value)
        if spec.get("autostart"):
            _set(app, vm, "autostart", True)
    for vm, key, value in deferred:
        _set(app, vm, key, value)
    for key, value in data.get("global", {}).items():
        _set(app, app, key, value)
    app.autosave = True
    return app


def _create(app: QubesApp, spec: dict[str, Any], default_template: str | None) -> Qube:
    try:
        name = names.validate_name(str(spec["name"]))
        klass = str(spec["class"])
        label = app.label_by_name(str(spec["label"]))
    except (KeyError, exc.QubesException) as err:
        raise FleetError(f"qube {spec.get('name')!r}: {err}") from err
    if klass not in ("AppVM", "TemplateVM", "StandaloneVM", "DispVM"):
        raise FleetError(f"qube {name}: unsupported class {klass!r}")
    if name in app.domains:
        raise FleetError(f"qube {name}: defined twice")
    template = None
    template_name = spec.get("template", default_template if klass == "AppVM" else None)
    if template_name is not None:
        template = app.domains.get(str(template_name))
        if template is None:
            raise FleetError(f"qube {name}: template {template_name!r} not defined before it")
    try:
        vm = lifecycle.create_vm(app, klass, name, label, template)
        for tag in spec.get("tags", []):
            app.add_tag(vm, names.validate_tag(str(tag)))
        for feature, value in spec.get("features", {}).items():
            if not names.FEATURE_NAME_RE.match(feature):
                raise FleetError(f"qube {name}: bad feature name {feature!r}")
            app.set_feature(vm, feature, _payload(value).decode())
    except (exc.QubesException, ValueError) as err:
        raise FleetError(f"qube {name}: {err}") from err
    for vol, size in spec.get("volumes", {}).items():
        if vol not in vm.volumes or not isinstance(size, int) or size < 0:
            raise FleetError(f"qube {name}: bad volume {vol}={size!r}")
        vm.volumes[vol].size = size
    for dev in spec.get("block_devices", []):
        try:
            app.devices.expose(vm.name, BlockDeviceSpec.from_fleet(dev))
        except (KeyError, ValueError) as err:
            raise FleetError(f"qube {name}: bad block device {dev!r}: {err}") from err
    for dev in spec.get("usb_devices", []):
        try:
            app.usb_devices.expose(vm.name, UsbDeviceSpec.from_fleet(dev))
        except (KeyError, ValueError) as err:
            raise FleetError(f"qube {name}: bad usb device {dev!r}: {err}") from err
    return vm


def load_fleet(path: Path | None, paths: SimPaths | None = None) -> QubesApp:
    """Build an app from a fleet file (``None``: the built-in demo fleet).

    Args:
        path: The TOML fleet file, or None for ``data/fleets/demo.toml``.
        paths: Where the emulated dom0 lives. Without it nothing is written to disk and
            ``app.paths`` is a placeholder: set it before saving or serving.
    """
    if path is None:
        text = demo_fleet_text()
    else:
        raw = path.read_bytes()
        if len(raw) > MAX_FLEET_BYTES:
            raise FleetError("fleet file too large")
        text = raw.decode("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FleetError(f"fleet is not valid TOML: {err}") from err
    app = build(paths or SimPaths(Path("/nonexistent-qubes-mcp-root")), data)
    if paths is not None:
        materialize(app)
    return app


def materialize(app: QubesApp) -> None:
    """Create the private-volume directories of every qube under ``app.paths``."""
    for vm in app.domains.values():
        if vm.klass != "AdminVM":
            lifecycle.create_on_disk(app, vm)


def open_app(paths: SimPaths, fleet: Path | None) -> QubesApp:
    """The emulator's start-up: the saved state when there is one, else the fleet (saved)."""
    if paths.state_file.exists():
        return QubesApp.load(paths)
    app = load_fleet(fleet, paths)
    app.save()
    return app


async def boot(app: QubesApp) -> None:
    """Start every qube with ``autostart`` (what dom0's boot does), netvms first."""
    for vm in list(app.domains.values()):
        if vm.klass != "AdminVM" and vm.get("autostart", False) and vm.is_halted():
            await lifecycle.start(app, vm)
