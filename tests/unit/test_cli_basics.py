"""What a user trips over first: versions, a bad fleet file, an empty tool selection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qubes_mcp import __version__
from qubes_mcp.server.app import UnknownGroupError, build_server, select_groups
from qubes_mcp.server.groups import GROUPS
from qubes_mcp.server.transport import SimTransport

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", ["qubes-mcp", "qubes-mcp-admin"])
def test_both_commands_print_the_project_version(command: str) -> None:
    out = subprocess.run(
        [str(BIN / command), "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"{command} {__version__}"


def test_mcp_server_info_carries_the_project_version_not_fastmcps(tmp_path: Path) -> None:
    server = build_server(SimTransport(tmp_path, "mcp-control"))
    assert server.version == __version__


def test_a_selection_that_leaves_no_tool_is_an_error() -> None:
    with pytest.raises(UnknownGroupError, match="no tool"):
        select_groups(["read"], ["read"])
    with pytest.raises(UnknownGroupError, match="no tool"):
        select_groups(None, GROUPS)
    assert select_groups(["read"], []) == frozenset({"read"})


@pytest.mark.parametrize("text", [b"this is = = not toml", b"\xff\xfe", b"[[qube]]\nname = 3\n"])
def test_sim_run_with_a_bad_fleet_prints_one_line_and_exits_2(tmp_path: Path, text: bytes) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(text)
    out = subprocess.run(
        [
            str(BIN / "qubes-mcp"),
            "sim",
            "run",
            "--root",
            str(tmp_path / "root"),
            "--fleet",
            str(fleet),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "fleet" in out.stderr
