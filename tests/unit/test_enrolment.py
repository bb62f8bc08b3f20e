"""Enrolment by name (decision record 0010): the registry, the one membership predicate, and
the atomic commit of registry + policy.

Tags alone never put a qube in scope: Qubes copies them into disposables and clones. These
tests pin each half of the predicate (registration under the current uuid, and the tag).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.decide import decide, names_to_read
from qubes_mcp.dom0.enrolment import (
    PolicyRefusedError,
    Registry,
    RegistryError,
    RegistryFile,
    commit,
    drop,
    stale,
)
from qubes_mcp.dom0.errors import NotFoundError
from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME
from qubes_mcp.dom0.reader import FleetReader
from qubes_mcp.dom0.render import POLICY_NAME
from qubes_mcp.dom0.tiers import Scope, Tier, effective_tier
from tests.gate_fixtures import config, facts, qube

SCOPE = Scope("ai")
CFG = config()

# --- the predicate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "registered", "tier"),
    [
        ({"ai-managed", "ai-full"}, "member", Tier.FULL),
        ({"ai-managed", "ai-full"}, None, None),  # inherited by a disposable or a clone
        ({"ai-managed", "ai-full"}, "dump", None),
        ({"ai-exec"}, "member", None),  # registered, but the operator removed the tag
        ({"ai-managed", "ai-dump"}, "member", None),  # hybrid
        (set(), None, None),
    ],
)
def test_in_scope_needs_registration_and_tag(
    tags: set[str], registered: str | None, tier: Tier | None
) -> None:
    assert effective_tier(SCOPE, tags, registered, Tier.READ, Tier.FULL) == tier


def test_a_dump_sink_needs_its_registration_too() -> None:
    assert SCOPE.is_dump_sink({"ai-dump"}, "dump")
    assert not SCOPE.is_dump_sink({"ai-dump"}, None)
    assert not SCOPE.is_dump_sink({"ai-dump"}, "member")


INHERITED = [
    qube("disp9001", "ai-managed", "ai-full", klass="DispVM", registered=None),
    qube("ai-dev-copy", "ai-managed", "ai-exec", registered=None),
    qube("ai-sink-copy", "ai-dump", registered=None),
]


def _decide(op: str, target: str | None, **args: Any) -> None:
    operation = OPERATIONS_BY_NAME[op]
    full = {f.name: f.default for f in operation.fields} | args
    names = [*names_to_read(operation, target, full), "ai-egress"]
    decide(
        principal=CFG.principals["mcp-control"],
        op=operation,
        target=target,
        args=full,
        facts=facts(names, INHERITED),
        config=CFG,
    )


@pytest.mark.parametrize("name", [q.name for q in INHERITED])
@pytest.mark.parametrize("op", ["qube.info", "qube.run", "qube.remove", "qube.start"])
def test_inherited_tags_confer_nothing_on_a_target(op: str, name: str) -> None:
    args = {"command": ["true"]} if op == "qube.run" else {}
    with pytest.raises(NotFoundError) as info:
        _decide(op, name, **args)
    assert info.value.to_reply() == NotFoundError().to_reply()


@pytest.mark.parametrize("name", [q.name for q in INHERITED])
def test_inherited_tags_confer_nothing_on_a_reference(name: str) -> None:
    with pytest.raises(NotFoundError):
        _decide("file.copy", "ai-dev", destination=name, paths=["/home/user/x"])
    with pytest.raises(NotFoundError):
        _decide("property.set", "ai-build", property="default_dispvm", value=name)


# --- the registry --------------------------------------------------------------------------


def test_registry_round_trips_and_a_missing_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "enrolment.json"
    assert Registry.load(path).scopes() == []
    r = Registry().enrolled("ai", "ai-dev", "u-1", "AppVM", by="operator")
    r = r.enrolled("ai", "ai-notes", "u-2", "AppVM", role="dump", by="operator")
    path.write_bytes(r.to_bytes())
    again = Registry.load(path)
    assert again == r
    assert set(again.members("ai")) == {"ai-dev"} and set(again.dumps("ai")) == {"ai-notes"}
    assert again.role_of("ai", "ai-dev", "u-1") == "member"
    assert again.role_of("ai", "ai-dev", "u-other") is None  # re-created under the same name
    assert again.role_of("ai", "ai-dev", "") is None
    assert again.role_of("lab", "ai-dev", "u-1") is None  # another scope


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "scopes": {}}',
        '{"version": 1, "scopes": {"ai": {"@anyvm": {"uuid": "u", "role": "member", '
        '"class": "AppVM", "by": "operator", "at": "t"}}}}',
        '{"version": 1, "scopes": {"ai": {"dom0": {"uuid": "u", "role": "member", '
        '"class": "AdminVM", "by": "operator", "at": "t"}}}}',
        '{"version": 1, "scopes": {"ai": {"x": {"uuid": "u", "role": "owner", '
        '"class": "AppVM", "by": "operator", "at": "t"}}}}',
        '{"version": 1, "scopes": {"AI ": {}}}',
    ],
)
def test_a_broken_registry_fails_closed(tmp_path: Path, text: str) -> None:
    # a name in it becomes a policy token: "@anyvm" or "dom0" must never get that far
    path = tmp_path / "enrolment.json"
    path.write_text(text)
    with pytest.raises(RegistryError):
        Registry.load(path)


@pytest.mark.parametrize("name", ["dom0", "@anyvm", "*", "a b", ""])
def test_only_qube_names_other_than_dom0_can_be_registered(name: str) -> None:
    with pytest.raises(ValueError):
        Registry().enrolled("ai", name, "u", "AppVM", by="operator")


def test_reconcile_drops_gone_and_recreated_names_but_keeps_a_fresh_enrolment() -> None:
    r = Registry()
    for name, uuid in [("a", "1"), ("b", "2"), ("c", "3")]:
        r = r.enrolled("ai", name, uuid, "AppVM", by="operator")
    gone = stale(r, {"a": "1", "b": "other"})  # b re-created, c removed
    assert sorted(n for _, n, _ in gone) == ["b", "c"]
    # meanwhile the operator enrolled the new b: the drop keeps it
    fresh = r.enrolled("ai", "b", "other", "AppVM", by="operator")
    after = drop(gone)(fresh)
    assert set(after.entries("ai")) == {"a", "b"} and after.entry("ai", "b").uuid == "other"  # type: ignore[union-attr]


def _render(registry: Registry) -> str:
    from qubes_mcp.dom0.render import render_policy

    return render_policy(CFG, registry)


def test_commit_writes_registry_and_policy_together(tmp_path: Path) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.d"
    new = commit(
        state, policy, lambda r: r.enrolled("ai", "ai-dev", "u", "AppVM", by="operator"), _render
    )
    assert Registry.load(state / "enrolment.json") == new
    assert "ai-dev" in (policy / POLICY_NAME).read_text().split()
    assert json.loads((state / "enrolment.json").read_text())["version"] == 1


def test_a_policy_that_does_not_validate_writes_nothing(tmp_path: Path) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.d"
    commit(state, policy, lambda r: r.enrolled("ai", "a", "u", "AppVM", by="operator"), _render)
    before = ((state / "enrolment.json").read_bytes(), (policy / POLICY_NAME).read_bytes())
    (policy / "31-broken.policy").write_text("this is not policy\n")
    with pytest.raises(PolicyRefusedError):
        commit(state, policy, lambda r: r.enrolled("ai", "b", "v", "AppVM", by="gate:x"), _render)
    after = ((state / "enrolment.json").read_bytes(), (policy / POLICY_NAME).read_bytes())
    assert after == before


def test_the_gates_view_rereads_only_a_replaced_file(tmp_path: Path) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.d"
    view = RegistryFile(state / "enrolment.json")
    assert view.current().scopes() == []
    commit(state, policy, lambda r: r.enrolled("ai", "a", "u", "AppVM", by="operator"), _render)
    assert view.current().entry("ai", "a") is not None


# --- the reader: uuid read with the facts --------------------------------------------------


def _uuid(client: AdminClient, name: str) -> str:
    line = asyncio.run(client.lines(name, "admin.vm.List"))[0]
    return line.rsplit("uuid=", 1)[1]


def test_the_reader_wants_the_registered_uuid(qubesd: Any) -> None:
    client = AdminClient(qubesd.paths.qubesd_sock)
    right = Registry().enrolled("ai", "ai-dev", _uuid(client, "ai-dev"), "AppVM", by="operator")
    wrong = Registry().enrolled("ai", "ai-dev", "0" * 36, "AppVM", by="operator")
    assert asyncio.run(FleetReader(client, SCOPE, right).in_scope("ai-dev"))
    assert not asyncio.run(FleetReader(client, SCOPE, wrong).in_scope("ai-dev"))
    assert not asyncio.run(FleetReader(client, SCOPE, Registry()).in_scope("ai-dev"))
    q = asyncio.run(FleetReader(client, SCOPE, wrong).qube("ai-dev"))
    assert q is not None and q.registered is None and not q.props  # read no further


def test_an_unregistered_name_costs_what_a_missing_one_costs(qubesd: Any) -> None:
    client = AdminClient(qubesd.paths.qubesd_sock)
    reader = FleetReader(client, SCOPE, Registry())
    trips = []
    for name in ("ai-dev", "no-such-qube", "vault"):
        before = client.round_trips
        asyncio.run(reader.qube(name))
        trips.append(client.round_trips - before)
    assert trips == [1, 1, 1]


def test_doctor_reports_strays_and_recreated_names_as_errors(qubesd: Any, tmp_path: Path) -> None:
    from qubes_mcp.dom0.enrolment import registry_path
    from qubes_mcp.dom0.operator.doctor import doctor
    from tests.gate_fixtures import CONFIG_TEXT

    config_path = tmp_path / "config.toml"
    config_path.write_text(
        CONFIG_TEXT + f'\n[paths]\nqubesd_socket = "{qubesd.paths.qubesd_sock}"\n'
        f'state_dir = "{tmp_path}/state"\npolicy_dir = "{tmp_path}/policy.d"\n'
    )
    client = AdminClient(qubesd.paths.qubesd_sock)
    # ai-dev registered under another uuid (re-created); ai-build tagged but never registered
    registry = Registry().enrolled("ai", "ai-dev", "0" * 36, "AppVM", by="operator")
    registry = registry.enrolled("ai", "ai-web", _uuid(client, "ai-web"), "AppVM", by="operator")
    path = registry_path(tmp_path / "state")
    path.parent.mkdir()
    path.write_bytes(registry.to_bytes())
    found = [str(f) for f in asyncio.run(doctor(tmp_path, config_path))]
    assert any(
        f.startswith("error: ai-dev is registered in ai under another uuid") for f in found
    ), found
    assert any(
        f.startswith("error: ai-build carries ai-full, ai-managed but is not enrolled in ai")
        and "tags copied from an enrolled qube" in f
        for f in found
    ), found
    assert not any(f.startswith("error: ai-web") for f in found), found
