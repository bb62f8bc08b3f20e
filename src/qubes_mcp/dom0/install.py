"""Installing the gate into a dom0 — a real one (``--root /``) or an emulator's root.

``install`` writes the configuration (only if absent), the generated policy (validated with
the rest of the policy directory by our own engine, then an atomic replace), one
``/etc/qubes-rpc/qmcp.<Op>`` link per operation to the gate's socket, and the systemd unit.
``uninstall`` removes all of that again (the configuration and the audit log stay unless
``purge``). ``status`` reports what is there; ``doctor`` (in doctor.py) looks at the fleet.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qubes_mcp.dom0.audit import AuditLog
from qubes_mcp.dom0.config import GateConfig, load_config
from qubes_mcp.dom0.fsutil import atomic_write, locked
from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.dom0.render import POLICY_NAME, validated_policy
from qubes_mcp.policy import Policy

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
# documented in src/qubes_mcp/dom0/config.py. While this file is broken, the gate refuses
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
        )
    egress_line = (
        f'egress_qube = "{egress}"\n'
        if egress
        else (
            '# egress_qube = "ai-egress"   # the one qube sandbox qubes reach the network through\n'
        )
    )
    return CONFIG_TEMPLATE.format(egress=egress_line, principal=principal, paths=paths)


def stage_policy(layout: Layout, config: GateConfig) -> str:
    """Render, then validate it together with every other file of the policy directory."""
    text = validated_policy(config)
    with tempfile.TemporaryDirectory(prefix="qubes-mcp-policy-") as tmp:
        staged = Path(tmp) / "policy.d"
        if layout.policy_dir.is_dir():
            shutil.copytree(layout.policy_dir, staged, symlinks=True)
        staged.mkdir(exist_ok=True)
        (staged / POLICY_NAME).write_text(text)
        Policy.load([staged])  # raises PolicySyntaxError naming file and line
    return text


def install(
    root: Path,
    *,
    principal: str = "mcp-control",
    egress: str | None = None,
    exe: str = "/usr/bin/qubes-mcp-admin",
) -> list[str]:
    """Install into ``root``; returns what was done, one line each."""
    layout = Layout(root)
    done = []
    if not layout.config.exists():
        atomic_write(layout.config, default_config_text(layout, principal, egress).encode(), 0o644)
        done.append(f"wrote {layout.config}")
    config = load_config(layout.config)
    with locked(layout.policy_dir):
        text = stage_policy(layout, config)
        atomic_write(layout.policy, text.encode(), 0o644)
    done.append(f"wrote {layout.policy} (validated)")
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
    if not config.paths.audit_log.exists():
        # the only place the chain may start; the daemon opens it with create=False
        with AuditLog(config.paths.audit_log, create=True) as log:
            log.append(principal="operator", op="install", decision="allowed", outcome="ok")
        done.append(f"started the audit log {config.paths.audit_log}")
    return done


def uninstall(root: Path, *, purge: bool = False) -> list[str]:
    layout = Layout(root)
    done = []
    for path in [layout.policy, *layout.links(), layout.unit]:
        if path.is_symlink() or path.exists():
            path.unlink()
            done.append(f"removed {path}")
    if purge and layout.config.exists():
        config = load_config(layout.config)
        for path in (layout.config, config.paths.audit_log):
            if path.exists():
                path.unlink()
                done.append(f"removed {path}")
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
        report["policy_current"] = (
            layout.policy.exists() and layout.policy.read_text() == validated_policy(config)
        )
        report["gate_socket"] = config.paths.gate_socket.exists()
    return report
