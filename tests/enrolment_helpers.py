"""Enrolment for tests, the way the operator does it: by name, through the registry.

``registry_for`` builds the registry a migrated demo fleet has (every qube carrying an ``ai``
scope tag, registered under a stable made-up uuid); ``enrol``/``unenrol`` run the operator's
``qubes-mcp-admin enrol|unenrol`` against a running stack (tags alone no longer enrol anyone:
decision record 0010).
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Iterable

from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.enrolment import Registry
from qubes_mcp.dom0.facts import QubeFacts
from qubes_mcp.stack import Stack


def uuid_of(name: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{name}.qubes-mcp.test"))


def registry_for(qubes: Iterable[QubeFacts], scope: str = "ai") -> Registry:
    registry = Registry()
    for q in qubes:
        tags = set(q.tags)
        if q.registered is not None and ((f"{scope}-managed" in tags) != (f"{scope}-dump" in tags)):
            registry = registry.enrolled(
                scope, q.name, uuid_of(q.name), q.klass, role=q.registered, by="operator"
            )
    return registry


def enrol(stack: Stack, name: str, *extra: str) -> str:
    """``qubes-mcp-admin enrol NAME [--tier T | --dump]``; fails the test if it fails."""
    done = stack.admin("enrol", name, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


def unenrol(stack: Stack, name: str) -> str:
    done = stack.admin("unenrol", name)
    assert done.returncode == 0, done.stderr
    return done.stdout


def migrate_tagged(config: GateConfig) -> Registry:
    """Register every qube carrying a scope tag, as the first ``install`` does (for tests
    that run the gate in-process against an emulated qubesd)."""
    from qubes_mcp.dom0.enrolment import commit, registry_path
    from qubes_mcp.dom0.operator.install import _migrate, scan_fleet
    from qubes_mcp.dom0.render import render_policy

    scan = asyncio.run(
        scan_fleet(config, Registry.load(registry_path(config.paths.state_dir)), first=True)
    )
    return commit(
        config.paths.state_dir,
        config.paths.policy_dir,
        _migrate(scan),
        lambda registry: render_policy(config, registry),
    )


def in_process_config(qubesd_sock: object, state: object, extra: str = "") -> GateConfig:
    """The configuration of a gate run in-process against an emulated qubesd: its registry and
    policy live under ``state`` (never dom0's real paths), and the fleet's tagged qubes are
    enrolled by name as the first ``install`` would."""
    from qubes_mcp.dom0.config import parse_config
    from tests.gate_fixtures import CONFIG_TEXT

    config = parse_config(
        CONFIG_TEXT
        + extra
        + f'\n[paths]\nqubesd_socket = "{qubesd_sock}"\n'
        + f'state_dir = "{state}/state"\npolicy_dir = "{state}/policy.d"\n'
    )
    migrate_tagged(config)
    return config
