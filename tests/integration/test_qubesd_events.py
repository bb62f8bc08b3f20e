"""admin.Events streams, internal.GetSystemInfo and the policy filters for non-dom0 callers."""

from __future__ import annotations

import json

import pytest

from tests.qubesd_fixtures import EventStream, Qubesd, demo_fixture, err, ok  # noqa: F401 - fixture

POLICY = """\
admin.vm.List * ai-dev @tag:ai-managed allow target=dom0
admin.vm.List * ai-dev @adminvm allow target=dom0
admin.vm.List * ai-dev work ask default_target=dom0
admin.Events +domain-start ai-dev @tag:ai-managed allow target=dom0
admin.Events +connection-established ai-dev @adminvm allow target=dom0
"""


@pytest.fixture
def with_policy(demo: Qubesd) -> Qubesd:
    policy_dir = demo.paths.policy_dirs[1]
    policy_dir.mkdir(parents=True, exist_ok=True)
    (policy_dir / "30-test.policy").write_text(POLICY)
    return demo


def test_events_start_with_connection_established_and_include_pre_events(demo: Qubesd) -> None:
    stream = EventStream(demo)
    try:
        stream.wait_for(lambda ev: len(ev) >= 1)
        assert stream.events[0] == ("", "connection-established", {})
        demo.call("work", "admin.vm.property.Set", "vcpus", b"4")
        stream.wait_for(lambda ev: any(e == "property-set:vcpus" for _, e, _ in ev))
        assert stream.events[1:] == [
            ("work", "property-pre-set:vcpus", {"name": "vcpus", "newvalue": "4", "oldvalue": "2"}),
            ("work", "property-set:vcpus", {"name": "vcpus", "newvalue": "4", "oldvalue": "2"}),
        ]
    finally:
        stream.close()


def test_admin_permission_events_are_never_streamed(demo: Qubesd) -> None:
    stream = EventStream(demo)
    try:
        demo.call("work", "admin.vm.tag.Set", "t1")
        stream.wait_for(lambda ev: any(e == "domain-tag-add:t1" for _, e, _ in ev))
        assert not [e for _, e, _ in stream.events if e.startswith("admin-permission:")]
    finally:
        stream.close()


def test_vm_dest_stream_only_carries_that_qube(demo: Qubesd) -> None:
    stream = EventStream(demo, dest="work")
    try:
        stream.wait_for(lambda ev: len(ev) == 1)
        demo.call("vault", "admin.vm.tag.Set", "other")
        demo.call("work", "admin.vm.tag.Set", "mine")
        stream.wait_for(lambda ev: any(e == "domain-tag-add:mine" for _, e, _ in ev))
        assert {s for s, _, _ in stream.events} == {"", "work"}
    finally:
        stream.close()


def test_stream_follows_domain_add_and_delete(demo: Qubesd) -> None:
    stream = EventStream(demo)
    try:
        demo.call("dom0", "admin.vm.Create.AppVM", "", b"name=newbie label=red")
        demo.call("newbie", "admin.vm.tag.Set", "hello")
        demo.call("newbie", "admin.vm.Remove")
        stream.wait_for(lambda ev: ("", "domain-delete", {"vm": "newbie"}) in ev)
        names = stream.names()
        assert names.index("domain-add") < names.index("domain-tag-add:created-by-dom0")
        assert names.index("domain-tag-add:hello") < names.index("domain-pre-delete")
        assert names[-1] == "domain-delete"
    finally:
        stream.close()


def test_tag_created_vm_with(demo: Qubesd) -> None:
    demo.call("mcp-control", "admin.vm.feature.Set", "tag-created-vm-with", b"managed-by-mcp ai-x")
    assert (
        demo.call("dom0", "admin.vm.Create.AppVM", "", b"name=made label=red", src="mcp-control")
        == ok()
    )
    assert demo.call("made", "admin.vm.tag.List") == ok(
        "ai-x\naudiovm-dom0\ncreated-by-mcp-control\nguivm-dom0\nmanaged-by-mcp\n"
    )


def test_created_by_tags_are_protected_from_qubes(demo: Qubesd) -> None:
    demo.call("dom0", "admin.vm.Create.AppVM", "", b"name=made label=red", src="mcp-control")
    before = demo.snapshot()
    assert (
        demo.call("made", "admin.vm.tag.Remove", "created-by-mcp-control", src="mcp-control") == b""
    )
    assert demo.call("made", "admin.vm.tag.Set", "created-by-dom0", src="ai-dev") == b""
    assert demo.snapshot() == before
    assert demo.call("made", "admin.vm.tag.Remove", "created-by-mcp-control") == ok()


def _sysinfo(q: Qubesd) -> dict[str, dict[str, object]]:
    reply = q.raw(b"internal.GetSystemInfo+ dom0 name dom0\0", internal=True)
    assert reply.startswith(b"0\0")
    return json.loads(reply[2:])["domains"]  # type: ignore[no-any-return]


def test_system_info_shape(demo: Qubesd) -> None:
    info = _sysinfo(demo)
    assert set(info["work"]) == {
        "internal",
        "tags",
        "type",
        "template_for_dispvms",
        "default_dispvm",
        "icon",
        "label",
        "guivm",
        "relayvm",
        "transport_rpc",
        "power_state",
        "uuid",
    }
    assert info["ai-dvm"]["template_for_dispvms"] is True
    assert info["work"]["default_dispvm"] == "default-dvm"
    assert info["work"]["label"] == "0x3465a4" and info["work"]["icon"] == "appvm-blue"
    assert info["dom0"]["type"] == "AdminVM" and info["dom0"]["guivm"] is None


def test_system_info_follows_add_and_delete(demo: Qubesd) -> None:
    """qubes-issues#10911: the cached snapshot must not miss a new or keep a removed qube."""
    assert "fresh" not in _sysinfo(demo)
    demo.call("dom0", "admin.vm.Create.AppVM", "", b"name=fresh label=red")
    assert "fresh" in _sysinfo(demo)
    demo.call("fresh", "admin.vm.Remove")
    assert "fresh" not in _sysinfo(demo)
    demo.call("work", "admin.vm.Start")
    assert _sysinfo(demo)["work"]["power_state"] == "Running"


def test_internal_methods_are_not_on_the_admin_socket(demo: Qubesd) -> None:
    assert demo.raw(b"internal.GetSystemInfo+ dom0 name dom0\0") == b""
    assert demo.raw(b"admin.vm.List+ dom0 name dom0\0", internal=True) == b""


def test_vm_list_is_filtered_by_policy_for_qubes(with_policy: Qubesd) -> None:
    listing = with_policy.call("dom0", "admin.vm.List", src="ai-dev").decode()
    names = [line.split(" ")[0] for line in listing[2:].splitlines()]
    assert names == [
        "dom0",
        "ai-build",
        "ai-debian",
        "ai-dev",
        "ai-dvm",
        "ai-egress",
        "ai-notes",
        "ai-usb",
        "ai-web",
    ]  # every qube tagged ai-managed (the demo fleet)
    assert with_policy.call("dom0", "admin.vm.List", src="ai-notes") == ok("")
    assert b"\nwork " in with_policy.call("dom0", "admin.vm.List")


def test_vm_list_without_policy_is_empty_for_qubes(demo: Qubesd) -> None:
    assert demo.call("dom0", "admin.vm.List", src="ai-dev") == ok("")


def test_broken_policy_denies_everything(with_policy: Qubesd) -> None:
    (with_policy.paths.policy_dirs[1] / "31-broken.policy").write_text("this is not policy\n")
    assert with_policy.call("dom0", "admin.vm.List", src="ai-dev") == ok("")


def test_events_are_filtered_by_policy_for_qubes(with_policy: Qubesd) -> None:
    stream = EventStream(with_policy, src="ai-dev")
    try:
        stream.wait_for(lambda ev: len(ev) == 1)
        with_policy.call("vault", "admin.vm.Start")
        with_policy.call("ai-notes", "admin.vm.tag.Set", "x")
        with_policy.call("ai-notes", "admin.vm.Start")
        stream.wait_for(lambda ev: ("ai-notes", "domain-start", {"start_guid": "True"}) in ev)
        assert stream.events == [
            ("", "connection-established", {}),
            ("ai-notes", "domain-start", {"start_guid": "True"}),
        ]
    finally:
        stream.close()


def test_clone_sequence_through_the_socket(demo: Qubesd) -> None:
    """What qubesadmin's clone_vm sends (admin-api §2.7), in order."""
    demo.call("work", "admin.vm.property.Set", "vcpus", b"3")
    demo.call("work", "admin.vm.firewall.Set", "", b"action=drop\n")
    assert (
        demo.call("dom0", "admin.vm.Create.AppVM", "debian-13-xfce", b"name=w2 label=blue") == ok()
    )
    for line in demo.call("work", "admin.vm.property.List")[2:].decode().splitlines():
        got = demo.call("work", "admin.vm.property.Get", line)[2:].decode()
        default, _, rest = got.partition(" ")
        if default == "default=False" and line not in ("name", "qid", "uuid", "label", "template"):
            value = rest.partition(" ")[2]
            assert demo.call("w2", "admin.vm.property.Set", line, value.encode()) == ok()
    demo.call("w2", "admin.vm.firewall.Set", "", demo.call("work", "admin.vm.firewall.Get")[2:])
    token = demo.call("work", "admin.vm.volume.CloneFrom", "private")[2:]
    assert demo.call("w2", "admin.vm.volume.CloneTo", "private", token) == ok()
    assert demo.call("w2", "admin.vm.property.Get", "vcpus") == ok("default=False type=int 3")
    assert demo.call("w2", "admin.vm.property.Get", "netvm") == ok("default=False type=vm ")
    assert demo.call("w2", "admin.vm.firewall.Get") == ok("action=drop\n")
    assert demo.call("w3", "admin.vm.List") == err("QubesVMNotFoundError", "No such domain: 'w3'")
