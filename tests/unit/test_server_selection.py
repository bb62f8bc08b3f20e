"""Which tools are offered: --read-only, --tools, --disable; and HTTP binds to loopback only."""

from __future__ import annotations

import pytest

from qubes_mcp.dom0.operations import OPERATIONS
from qubes_mcp.server.app import UnknownGroupError, select_groups
from qubes_mcp.server.cli import NotLoopbackError, check_loopback
from qubes_mcp.server.groups import GROUPS
from qubes_mcp.server.registry import tool_name
from tests.server.helpers import list_tools, offline_server

READ_TOOLS = {tool_name(op.name) for op in OPERATIONS if op.read_only} | {"capabilities_get"}


def test_read_only_registers_exactly_the_read_only_operations() -> None:
    tools = list_tools(offline_server(read_only=True))
    assert {t.name for t in tools} == READ_TOOLS
    assert all(t.annotations and t.annotations.read_only_hint for t in tools)


def test_read_only_wins_over_an_explicit_write_group() -> None:
    tools = list_tools(offline_server(groups=frozenset({"read", "exec"}), read_only=True))
    assert {t.name for t in tools} == READ_TOOLS


def test_tools_selects_groups() -> None:
    tools = list_tools(offline_server(groups=select_groups(["power"])))
    assert {t.name for t in tools} == {
        "qube_start",
        "qube_shutdown",
        "qube_pause",
        "qube_unpause",
        "qube_kill",
    }


def test_disable_removes_groups() -> None:
    names = {t.name for t in list_tools(offline_server(groups=select_groups(None, ["remove"])))}
    assert "qube_remove" not in names and "qube_run" in names


def test_every_tool_is_in_exactly_one_known_group() -> None:
    for t in list_tools(offline_server()):
        tags = (t.meta or {}).get("fastmcp", {}).get("tags", [])
        assert len(tags) == 1 and tags[0] in GROUPS, t.name


@pytest.mark.parametrize("bad", [["reed"], ["read", "all"], [""]], ids=["typo", "unknown", "empty"])
def test_unknown_group_is_an_error_not_silently_ignored(bad: list[str]) -> None:
    with pytest.raises(UnknownGroupError):
        select_groups(bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.53"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert check_loopback(host) == host


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "10.137.0.5", "192.168.1.2", "example.com", "localhost.evil.com", ""],
    ids=["all-v4", "all-v6", "qubes-lan", "home-lan", "dns-name", "lookalike", "empty"],
)
def test_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(NotLoopbackError):
        check_loopback(host)
