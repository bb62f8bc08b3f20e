"""``qubes-mcp serve --check --sim ROOT`` against a running emulator: OK with the scope size,
then the gate's service gone (exit 127 from the router) and another qube as principal (policy
refusal) each named."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from qubes_mcp.stack import Stack, start_stack

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("check") / "root")
    try:
        yield s
    finally:
        s.stop()


def check(stack: Stack, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "qubes_mcp.cli",
            "serve",
            "--check",
            "--sim",
            str(stack.root),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ok_with_the_scope_size(stack: Stack) -> None:
    out = check(stack)
    assert out.returncode == 0, out.stderr
    assert 'OK: the gate answers; principal "mcp-control" has' in out.stdout


def test_a_qube_that_is_not_a_principal_is_refused_by_policy(stack: Stack) -> None:
    out = check(stack, "--principal", "work")
    assert out.returncode == 1
    assert "qrexec policy in dom0 refused qmcp.List from this qube (exit 126)" in out.stderr


def test_a_missing_gate_service_is_named(stack: Stack) -> None:
    link = stack.root / "etc/qubes-rpc/qmcp.List"
    target = link.readlink()
    link.unlink()
    try:
        out = check(stack)
    finally:
        link.symlink_to(target)
    assert out.returncode == 1
    assert "dom0 has no qmcp.List service, or the gate is not running" in out.stderr, out.stderr
