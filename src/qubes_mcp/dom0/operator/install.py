"""Installing the gate into a dom0 — a real one (``--root /``) or an emulator's root.

``install`` writes the configuration (only if absent), the enrolment registry and the generated
policy (validated with the rest of the policy directory by our own engine, then an atomic
replace; ``enrolment.commit``), one ``/etc/qubes-rpc/qmcp.<Op>`` link per operation to the
gate's socket, and the systemd unit.

Enrolment is by name (decision record 0010). The first install (no registry yet) migrates a
fleet enrolled the old way: it registers every qube that carries ``<scope>-managed`` or
``<scope>-dump`` and prints each one, so the operator sees exactly who entered a scope. Later
installs register nobody: a scope tag on an unregistered qube is then a stray (typically
copied into the operator's own disposable or clone) and install refuses until the operator
removes the tags or enrols the qube. Either way, a stray tier tag (``<scope>-exec`` …) on a
qube that is neither registered nor being migrated makes install refuse.
``uninstall`` removes all of that again (the configuration and the audit log stay unless
``purge``). ``status`` reports what is there; ``doctor`` (in doctor.py) looks at the fleet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.audit.files import anchor_path, archives, exported_path, lock_path
from qubes_mcp.dom0.audit.log import AuditLog, chain_exists
from qubes_mcp.dom0.config import DEFAULT_PATHS, GateConfig, Paths, load_config
from qubes_mcp.dom0.enrolment import Change, Registry, commit, registry_path
from qubes_mcp.dom0.errors import GateError, InvalidInputError
from qubes_mcp.dom0.fsutil import atomic_write
from qubes_mcp.dom0.names import is_valid_qube_name
from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.dom0.operator.qubes_policy_tools import PolicyTools
from qubes_mcp.dom0.reader import parse_vm_list_line
from qubes_mcp.dom0.render import (
    FORMER_POLICY_NAMES,
    POLICY_NAME,
    render_policy,
    validated_policy,
)
from qubes_mcp.dom0.tiers import DUMP, MEMBER, Tier


class InstallRefusedError(GateError):
    """Stray scope tags on unregistered qubes: install changes nothing until they are fixed."""

    code = "not-allowed"

    def __init__(self, strays: list[str]) -> None:
        super().__init__(
            "refusing to install while scope tags sit on qubes that are not enrolled:\n  "
            + "\n  ".join(strays)
        )
        self.strays = strays


UNIT_NAME = "qubes-mcp-gate.service"
UNIT_TEXT = """[Unit]
Description=qubes-mcp gate: the qmcp.* qrexec services that let AI agents act, within limits
After=qubesd.service
Requires=qubesd.service

[Service]
Type=simple
ExecStart={exe} gate --config {config}
Restart=on-failure
UMask=0077
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""

CONFIG_TEMPLATE = """# qubes-mcp gate configuration. See docs/operator-guide.md; every key is
# documented in docs/configuration.md. While this file is broken, the gate refuses
# every request.
default_tier = "read"
{egress}
[[principal]]
qube = "{principal}"
scope = "ai"
ceiling = "full"
name_prefix = "ai-"
may_create = true

[budget]
pool_cap = "64GiB"
private_cap = "20GiB"
max_qubes = 32

[consent]
timeout = 120
{paths}"""


@dataclass(frozen=True)
class Layout:
    """Where everything goes under one root (``/`` in a real dom0)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc/qubes-mcp/config.toml"

    @property
    def policy_dir(self) -> Path:
        return self.root / "etc/qubes/policy.d"

    @property
    def policy(self) -> Path:
        return self.policy_dir / POLICY_NAME

    def former_policies(self) -> list[Path]:
        """The generated file under a name it had before (decision record 0016)."""
        return [self.policy_dir / name for name in FORMER_POLICY_NAMES]

    @property
    def rpc_dir(self) -> Path:
        return self.root / "etc/qubes-rpc"

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system" / UNIT_NAME

    def links(self) -> list[Path]:
        return [self.rpc_dir / op.service for op in OPERATIONS]


def default_config_text(layout: Layout, principal: str, egress: str | None) -> str:
    paths = ""
    if layout.root != Path("/"):  # an emulator root: every path lives under it
        r = layout.root
        paths = (
            "\n[paths]\n"
            f'qubesd_socket = "{r}/run/qubesd.sock"\n'
            f'gate_socket = "{r}/run/qubes-mcp/gate.sock"\n'
            f'operator_socket = "{r}/run/qubes-mcp/operator.sock"\n'
            f'audit_log = "{r}/var/log/qubes-mcp/audit.log"\n'
            f'state_dir = "{r}/var/lib/qubes-mcp"\n'
            f'qrexec_client = "{r}/usr/lib/qubes/qrexec-client"\n'
            f'console_logs = "{r}/var/log/xen/console"\n'
            f'policy_dir = "{r}/etc/qubes/policy.d"\n'
        )
    egress_line = (
        f'egress_qube = "{egress}"\n'
        if egress
        else (
            '# egress_qube = "ai-egress"   # the one qube sandbox qubes reach the network through\n'
        )
    )
    return CONFIG_TEMPLATE.format(egress=egress_line, principal=principal, paths=paths)


@dataclass(frozen=True)
class FleetScan:
    """What install found: registrations to add (scope, name, uuid, class, role) and strays."""

    migrate: list[tuple[str, str, str, str, str]]
    strays: list[str]


async def scan_fleet(config: GateConfig, registry: Registry, *, first: bool) -> FleetScan:
    """Walk the host once (an operator tool may): what to migrate, what is stray."""
    admin = AdminClient(config.paths.qubesd_socket)
    live: dict[str, tuple[str, str]] = {}
    for line in await admin.lines("dom0", "admin.vm.List"):
        name, fields = parse_vm_list_line(line)
        live[name] = (fields.get("uuid", ""), fields.get("class", ""))
    scopes = sorted({p.scope for p in config.principals.values()}, key=lambda s: s.prefix)
    migrate, strays = [], []
    for name, (uuid, klass) in sorted(live.items()):
        if name == "dom0":
            continue
        tags = set(await admin.lines(name, "admin.vm.tag.List"))
        for scope in scopes:
            registered = registry.role_of(scope.prefix, name, uuid)
            tiers = {t for t in (scope.tier_tag(x) for x in Tier) if t} & tags
            role = None
            if scope.managed in tags and scope.dump not in tags:
                role = MEMBER
            elif scope.dump in tags and scope.managed not in tags:
                role = DUMP
            if registered is None and role is not None and first:
                migrate.append((scope.prefix, name, uuid, klass, role))
                continue
            marks = sorted(tiers | ({scope.managed, scope.dump} & tags))
            if registered is None and marks:
                strays.append(
                    f"{name} carries {', '.join(marks)} but is not enrolled in {scope.prefix} "
                    "(tags copied from an enrolled qube, e.g. a disposable or a clone?): "
                    f"remove the tags (qvm-tags {name} del …) or run "
                    f"`qubes-mcp-admin enrol {name}`"
                )
    return FleetScan(migrate, strays)


def _migrate(scan: FleetScan) -> Change:
    def apply(registry: Registry) -> Registry:
        for scope, name, uuid, klass, role in scan.migrate:
            registry = registry.enrolled(scope, name, uuid, klass, role=role, by="operator")
        return registry

    return apply


def install(
    root: Path,
    *,
    principal: str | None = None,
    egress: str | None = None,
    exe: str = "/usr/bin/qubes-mcp-admin",
    tools: PolicyTools | None = None,
) -> list[str]:
    """Install into ``root``; returns what was done, one line each.

    ``principal`` (default ``mcp-control``) and ``egress`` only seed a new configuration: with
    one already there they are reported as ignored, never silently dropped. A name qubesd
    would not accept (or ``dom0``) is refused before anything is written.
    ``tools``: Qubes' own policy tools (default: whichever dom0 has, ``PolicyTools.find``).

    Raises:
        InvalidInputError: a bad ``principal`` or ``egress`` (nothing written).
    """
    for flag, value in (("--principal", principal), ("--egress", egress)):
        if value is not None and (not is_valid_qube_name(value) or value == "dom0"):
            raise InvalidInputError(f"{flag} {value!r} is not a qube name that may be used here")
    layout = Layout(root)
    tools = tools if tools is not None else PolicyTools.find()
    done = []
    if not layout.config.exists():
        text = default_config_text(layout, principal or "mcp-control", egress)
        atomic_write(layout.config, text.encode(), 0o644)
        done.append(f"wrote {layout.config}")
    else:
        for flag, value in (("--principal", principal), ("--egress", egress)):
            if value is not None:
                done.append(
                    f"note: ignored {flag} {value}: {layout.config} exists and is kept; "
                    "edit it to change principals or the egress qube, then run install"
                )
    config = load_config(layout.config)
    path = registry_path(config.paths.state_dir)
    first = not path.exists()
    scan = asyncio.run(scan_fleet(config, Registry.load(path), first=first))
    if scan.strays:
        raise InstallRefusedError(scan.strays)
    config.paths.state_dir.mkdir(parents=True, exist_ok=True)
    config.paths.state_dir.chmod(0o700)
    policy_dir = config.paths.policy_dir
    through_qubes = tools.writes(policy_dir)
    commit(
        config.paths.state_dir,
        policy_dir,
        _migrate(scan),
        lambda registry: render_policy(config, registry),
        check=lambda text: tools.check(policy_dir, POLICY_NAME, text),
        write=(lambda text: tools.replace(POLICY_NAME, text)) if through_qubes else None,
    )
    if tools.lint is not None:
        done.append(f"checked the policy directory with {tools.lint}")
    for scope, name, _, klass, role in scan.migrate:
        what = "dump sink" if role == DUMP else klass
        done.append(f"enrolled {name} ({what}) in scope {scope}: it carried the scope's tag")
    how = f" through {tools.policy} --replace" if through_qubes else ""
    done.append(f"wrote {path} and {policy_dir / POLICY_NAME} (validated){how}")
    for name in FORMER_POLICY_NAMES:
        former = policy_dir / name
        if former.is_symlink() or former.exists():
            if through_qubes:
                tools.remove(name)
            else:
                former.unlink()
            done.append(f"removed {former} (the generated policy's former name)")
    layout.rpc_dir.mkdir(parents=True, exist_ok=True)
    for link in layout.links():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(config.paths.gate_socket)
    done.append(f"linked {len(layout.links())} qmcp.* services to {config.paths.gate_socket}")
    atomic_write(layout.unit, UNIT_TEXT.format(exe=exe, config=layout.config).encode(), 0o644)
    done.append(f"wrote {layout.unit}")
    for directory in (config.paths.audit_log.parent, config.paths.state_dir):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    if not chain_exists(config.paths.audit_log):
        # the only place the chain may start; the daemon opens it with create=False
        with AuditLog(config.paths.audit_log, create=True) as log:
            log.append(principal="operator", op="install", decision="allowed", outcome="ok")
        done.append(f"started the audit log {config.paths.audit_log}")
    return done


def _paths(layout: Layout) -> Paths:
    """Where install put the log and the state: the configuration's ``[paths]`` (read on its
    own, so a broken file still names them), or the defaults under the root without one."""
    from qubes_mcp.dom0.broken_config import fallback_paths

    if layout.config.exists():
        return fallback_paths(layout.config)
    return Paths(**{k: layout.root / str(v).lstrip("/") for k, v in DEFAULT_PATHS.items()})


def installed_files(root: Path, *, purge: bool = False) -> list[Path]:
    """What ``uninstall`` removes (that exists): the generated policy (and its former names,
    the policy directory's lock), the service links and the unit; with ``purge`` also the
    configuration, the audit log with its head, lock, export mark and rotated files, and
    the state directory's registry and lock."""
    layout = Layout(root)
    paths = _paths(layout)
    found = [
        layout.policy,
        *layout.former_policies(),
        paths.policy_dir / POLICY_NAME,
        paths.policy_dir / ".qubes-mcp.lock",
        *layout.links(),
        layout.unit,
    ]
    if purge:
        log = paths.audit_log
        found += [layout.config, log, anchor_path(log), lock_path(log), exported_path(log)]
        found += [p for _, p in archives(log)]
        state = paths.state_dir
        found += [registry_path(state), state / ".enrolment.lock"]
    return list(dict.fromkeys(p for p in found if p.is_symlink() or p.exists()))


def uninstall(root: Path, *, purge: bool = False) -> list[str]:
    """Remove what install wrote (and, with ``purge``, the configuration, the log and the
    state), then every directory that removal left empty, up to the root; returns one line
    per removal (none: nothing was installed, nothing changed)."""
    done = []
    removed = installed_files(root, purge=purge)
    for path in removed:
        path.unlink()
        done.append(f"removed {path}")
    root = root.resolve()
    for parent in sorted({p.parent.resolve() for p in removed}, key=lambda d: -len(d.parts)):
        for directory in (parent, *parent.parents):
            if directory == root or root not in directory.parents:
                break
            try:
                directory.rmdir()  # only if empty
            except OSError:
                break
            done.append(f"removed {directory}/ (left empty)")
    return done


def status(root: Path) -> dict[str, object]:
    """What is installed, and whether the policy on disk is what the config renders."""
    layout = Layout(root)
    report: dict[str, object] = {
        "config": layout.config.exists(),
        "policy": layout.policy.exists(),
        "unit": layout.unit.exists(),
    }
    links = [p for p in layout.links() if p.is_symlink()]
    report["links"] = f"{len(links)}/{len(layout.links())}"
    if layout.config.exists():
        config = load_config(layout.config)
        registry = Registry.load(registry_path(config.paths.state_dir))
        report["policy_current"] = layout.policy.exists() and layout.policy.read_text() == (
            validated_policy(config, registry)
        )
        report["gate_socket"] = config.paths.gate_socket.exists()
    return report
