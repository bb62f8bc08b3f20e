"""``qubes-mcp sim call`` as a user runs it: stdin to the service, its output to stdout,
126 and ``Request refused`` when denied."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_qrexec_fakes import Background

from qubes_mcp.stack import sim_call as stack_sim_call


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    with Background.running(tmp_path_factory.mktemp("simcall")) as bg:
        yield bg


def sim_call(
    root: Path, source: str, target: str, service: str, stdin: bytes
) -> subprocess.CompletedProcess[bytes]:
    return stack_sim_call(root, source, target, service, stdin, timeout=60)


def test_allowed_call_streams_stdin_to_stdout(router: Background) -> None:
    assert router.env is not None
    payload = bytes(range(256)) * 1024
    result = sim_call(router.env.paths.root, "work", "dom0", "test.Echo", payload)
    assert (result.returncode, result.stdout, result.stderr) == (0, payload, b"")


def test_denied_call_exits_126(router: Background) -> None:
    assert router.env is not None
    result = sim_call(router.env.paths.root, "personal", "dom0", "test.Echo", b"x")
    assert (result.returncode, result.stdout, result.stderr) == (126, b"", b"Request refused\n")


def test_no_router_is_a_local_problem(tmp_path: Path) -> None:
    result = sim_call(tmp_path, "work", "dom0", "test.Echo", b"")
    assert result.returncode == 125
    assert b"cannot reach the qrexec router" in result.stderr
