"""Lab links in dom0's registry and the policy they render (decision record 0018).

A link renders exactly one line, ``qubes.ConnectTCP +PORT CLIENT SERVER allow``, before the
client's deny lines; nothing else in the policy changes. It lives only while both its qubes
are registered members of its scope under the uuid they had, and it is written with the
policy in one commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qubes_mcp.dom0.enrolment import (
    Link,
    Registry,
    RegistryError,
    commit,
    drop,
    lost_links,
    new_link,
    stale,
)
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME
from qubes_mcp.dom0.render import POLICY_NAME, render_policy, validated_policy
from qubes_mcp.dom0.tiers import Tier
from qubes_mcp.policy import AccessDenied, Policy
from qubes_mcp.policy.sysinfo import SystemInfo
from tests.gate_fixtures import config

CFG = config()
BY = "gate:mcp-control"


def _base() -> Registry:
    r = Registry()
    for name in ("ai-web", "ai-build", "ai-usb"):
        r = r.enrolled("ai", name, f"uuid-{name}", "AppVM", by="operator")
    return r.enrolled("ai", "ai-dump", "uuid-ai-dump", "AppVM", role="dump", by="operator")


def _link(client: str = "ai-web", server: str = "ai-build", port: int = 8080) -> Link:
    return new_link("ai", client, server, port, by=BY)


def _connect_lines(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if "ConnectTCP" in ln and not ln.startswith("#")]


def test_a_link_renders_one_line_naming_both_qubes_and_the_port_and_nothing_else() -> None:
    base = _base()
    linked = base.linked(_link())
    before = render_policy(CFG, base).splitlines()
    after = render_policy(CFG, linked).splitlines()
    added = [ln for ln in after if ln not in before]
    assert [ln.split() for ln in added] == [
        ["qubes.ConnectTCP", "+8080", "ai-web", "ai-build", "allow"]
    ]
    assert [ln for ln in after if ln != added[0]] == before  # nothing else moved or changed
    # before the client's deny lines, so it can match at all
    index = after.index(added[0])
    denies = [i for i, ln in enumerate(after) if ln.split()[:3] == ["*", "*", "ai-web"]]
    assert denies and index < min(denies)
    validated_policy(CFG, linked)


def test_the_link_line_allows_only_that_call() -> None:
    policy = Policy.from_texts({POLICY_NAME: render_policy(CFG, _base().linked(_link()))})
    domains: dict[str, dict[str, object]] = {
        n: {"type": "AppVM", "tags": ["ai-managed"]}
        for n in ("ai-web", "ai-build", "ai-usb", "ai-dump", "work")
    }
    domains["dom0"] = {"type": "AdminVM", "tags": []}
    info = SystemInfo.from_json({"domains": domains})

    def allowed(arg: str, source: str, target: str) -> bool:
        try:
            policy.evaluate(
                service="qubes.ConnectTCP",
                argument=arg,
                source=source,
                target=target,
                system_info=info,
            )
        except AccessDenied:
            return False
        return True

    assert allowed("+8080", "ai-web", "ai-build")
    for arg, source, target in [
        ("+8081", "ai-web", "ai-build"),  # another port
        ("+8080", "ai-build", "ai-web"),  # the other way
        ("+8080", "ai-web", "ai-usb"),  # another server
        ("+8080", "ai-usb", "ai-build"),  # another client
        ("+8080", "ai-web", "work"),
        ("+8080", "ai-web", "@default"),
        ("+8080", "ai-web", "@dispvm"),
        ("+8080", "ai-web", "dom0"),
    ]:
        assert not allowed(arg, source, target), (arg, source, target)


@pytest.mark.parametrize("gone", ["ai-web", "ai-build"])
def test_unregistering_either_end_closes_the_link(gone: str) -> None:
    linked = _base().linked(_link()).linked(_link("ai-usb", "ai-build", 22))
    after = linked.unenrolled("ai", gone)
    left = [(k.client, k.server, k.port) for k in after.links()]
    assert left == ([("ai-usb", "ai-build", 22)] if gone == "ai-web" else [])
    assert "+8080" not in render_policy(CFG, after)
    lost = sorted(k.client for k in lost_links(linked, after))
    assert lost == (["ai-web"] if gone == "ai-web" else ["ai-usb", "ai-web"])


def test_a_name_registered_again_for_another_qube_does_not_inherit_the_link() -> None:
    linked = _base().linked(_link())
    again = linked.enrolled("ai", "ai-build", "uuid-new", "AppVM", by="operator")
    assert again.links() == ()
    # registering an unrelated name, or the same qube again, keeps it
    other = linked.enrolled("ai", "ai-notes", "uuid-ai-notes", "AppVM", by="operator")
    same = linked.enrolled("ai", "ai-build", "uuid-ai-build", "AppVM", by="operator")
    assert len(other.links()) == len(same.links()) == 1


def test_reconcile_drop_closes_the_links_of_a_gone_qube() -> None:
    linked = _base().linked(_link())
    live = {"ai-web": "uuid-ai-web", "ai-usb": "uuid-ai-usb", "ai-dump": "uuid-ai-dump"}
    after = drop(stale(linked, live))(linked)
    assert after.links() == () and "ConnectTCP" not in render_policy(CFG, after)


@pytest.mark.parametrize(
    ("client", "server", "port"),
    [
        ("ai-web", "ai-web", 8080),  # one qube
        ("ai-web", "ai-dump", 8080),  # a dump sink is no member
        ("ai-web", "work", 8080),  # not registered
        ("ai-web", "ai-build", 0),
        ("ai-web", "ai-build", 65536),
    ],
)
def test_a_link_needs_two_members_and_a_port(client: str, server: str, port: int) -> None:
    with pytest.raises(ValueError):
        _base().linked(Link("0" * 16, "ai", client, server, port, BY, "t"))


def test_the_registry_round_trips_and_refuses_bad_links(tmp_path: Path) -> None:
    linked = _base().linked(_link())
    path = tmp_path / "enrolment.json"
    path.write_bytes(linked.to_bytes())
    assert Registry.load(path) == linked
    raw = json.loads(linked.to_bytes())
    for bad in (
        {"port": 70000},
        {"port": "8080"},
        {"port": True},
        {"server": "ai-web"},
        {"client": "dom0"},
        {"server": "@anyvm"},
        {"id": "not-hex"},
    ):
        broken = dict(raw, links=[dict(raw["links"][0], **bad)])
        path.write_text(json.dumps(broken))
        with pytest.raises(RegistryError):
            Registry.load(path)


def test_a_stray_link_in_the_file_renders_nothing(tmp_path: Path) -> None:
    """A link whose ends are not registered members (a hand-edited file) gives no line."""
    raw = json.loads(_base().to_bytes())
    raw["links"] = [_link("ai-web", "work").to_json(), _link("ai-web", "ai-dump").to_json()]
    path = tmp_path / "enrolment.json"
    path.write_text(json.dumps(raw))
    assert _connect_lines(render_policy(CFG, Registry.load(path))) == []


def test_a_link_is_committed_with_its_policy_line_and_removed_with_it(tmp_path: Path) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.d"

    def render(registry: Registry) -> str:
        return render_policy(CFG, registry)

    commit(state, policy, lambda r: _base(), render)
    link = _link()
    new = commit(state, policy, lambda r: r.linked(link), render)
    assert Registry.load(state / "enrolment.json") == new
    assert _connect_lines((policy / POLICY_NAME).read_text()) == [
        ["qubes.ConnectTCP", "+8080", "ai-web", "ai-build", "allow"]
    ]
    commit(state, policy, lambda r: r.unlinked(link.id), render)
    assert _connect_lines((policy / POLICY_NAME).read_text()) == []
    assert Registry.load(state / "enrolment.json").links() == ()


def test_the_table_rows() -> None:
    """net on both qubes and consent to open; read-only listing; no consent to close (it only
    takes capability away); none of them reaches outside the machine."""
    opened, listed, closed = (OPERATIONS_BY_NAME[f"link.{n}"] for n in ("open", "list", "close"))
    assert (opened.needs, [(r.field, r.needs) for r in opened.refs], opened.consent) == (
        Tier.NET,
        [("server", Tier.NET)],
        True,
    )
    assert listed.read_only and listed.needs is Tier.READ
    assert not closed.consent and closed.needs is Tier.EXEC
    assert not any(op.open_world for op in (opened, listed, closed))
