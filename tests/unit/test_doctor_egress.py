"""``doctor``'s checks of a principal's egress qube (issue 10 §4): it exists, is enrolled in the
principal's scope, provides network, and runs the updates proxy its templates are sent to."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.operator.doctor import _egress_findings
from tests.unit.test_egress_per_principal_config import TWO


class FakeAdmin:
    def __init__(self, provides: bool, features: dict[str, str]) -> None:
        self.provides, self.features = provides, features

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        if method == "admin.vm.property.GetAll":
            return f"provides_network default=False type=bool {self.provides}\n"
        assert method == "admin.vm.feature.Get"
        return self.features[arg]

    async def lines(self, dest: str, method: str, arg: str = "") -> list[str]:
        assert method == "admin.vm.feature.List"
        return sorted(self.features)


PROXY = {"service.qubes-updates-proxy": "1"}
LIVE = {"sys-whonix": "uuid-w", "tor-control": "uuid-t"}


@pytest.mark.parametrize(
    ("live", "enrolled", "provides", "features", "expected"),
    [
        (LIVE, {"sys-whonix"}, True, PROXY, []),
        (
            {"tor-control": "u"},
            set(),
            True,
            PROXY,
            ["error: egress qube sys-whonix of tor-control does not exist"],
        ),
        (
            LIVE,
            set(),
            True,
            PROXY,
            ["error: egress qube sys-whonix of tor-control is not enrolled in tor"],
        ),
        (
            LIVE,
            {"sys-whonix"},
            False,
            PROXY,
            ["error: egress qube sys-whonix of tor-control does not provide network"],
        ),
        (
            LIVE,
            {"sys-whonix"},
            True,
            {},
            ["warning: egress qube sys-whonix of tor-control does not run the updates proxy"],
        ),
        (
            LIVE,
            {"sys-whonix"},
            True,
            {"service.qubes-updates-proxy": ""},
            ["warning: egress qube sys-whonix of tor-control does not run the updates proxy"],
        ),
    ],
    ids=["healthy", "missing", "not-enrolled", "no-network", "no-proxy", "proxy-off"],
)
def test_each_principals_egress_is_checked(
    live: dict[str, str],
    enrolled: set[str],
    provides: bool,
    features: dict[str, str],
    expected: list[str],
) -> None:
    principal = parse_config(TWO).principals["tor-control"]
    admin = cast(AdminClient, FakeAdmin(provides, features))
    found = asyncio.run(_egress_findings(admin, principal, "sys-whonix", live, enrolled))
    assert len(found) == len(expected), found
    assert all(str(f).startswith(e) for f, e in zip(found, expected, strict=True)), found
