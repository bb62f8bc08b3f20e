"""Hostile bytes at the qubesd socket: the server answers each with a well-formed reply or
nothing, never changes state for a read-only or malformed request, and keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.qubesd_fixtures import Qubesd, demo_app

READ_METHODS = [
    "admin.vm.List",
    "admin.vm.property.Get",
    "admin.vm.property.GetAll",
    "admin.vm.property.GetDefault",
    "admin.property.Get",
    "admin.vm.tag.Get",
    "admin.vm.feature.Get",
    "admin.vm.feature.CheckWithTemplate",
    "admin.vm.volume.Info",
    "admin.pool.Info",
    "admin.label.Get",
    "admin.vm.firewall.Get",
    "admin.vm.device.block.Available",
    "admin.vm.CurrentState",
    "admin.vm.notes.Get",
    "admin.vm.Nope",
    "",
]
NAMES = ["dom0", "work", "sys-net", "nosuch", "uuid:00000000-0000-0000-0000-000000000000", ""]
TOKENS = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40).map(
    lambda t: t.encode("utf-8", "surrogatepass")
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qubesd]:
    q = Qubesd(demo_app(tmp_path_factory.mktemp("fuzz") / "root")).start()
    try:
        yield q
    finally:
        q.stop()


def _well_formed(reply: bytes) -> bool:
    if reply == b"":
        return True
    if reply.startswith(b"0\0"):
        return True
    return reply.startswith(b"2\0") and reply.endswith(b"\0") and reply.count(b"\0") == 4


structured = st.builds(
    lambda m, arg, src, typ, dest, payload: (
        m.encode() + b"+" + arg + b" " + src + b" " + typ + b" " + dest + b"\0" + payload
    ),
    st.sampled_from(READ_METHODS),
    TOKENS,
    st.sampled_from([n.encode() for n in NAMES]) | TOKENS,
    st.sampled_from([b"name", b"keyword", b"adminvm", b""]),
    st.sampled_from([n.encode() for n in NAMES]) | TOKENS,
    st.binary(max_size=64),
)


@settings(max_examples=150)
@given(data=st.binary(max_size=512) | structured)
def test_random_requests_never_break_the_server(server: Qubesd, data: bytes) -> None:
    before = server.snapshot()
    reply = server.raw(data)
    assert _well_formed(reply)
    assert server.snapshot() == before
    assert (
        server.call("work", "admin.vm.property.Get", "label") == b"0\0default=False type=label blue"
    )


@settings(max_examples=40)
@given(prefix=st.binary(min_size=1, max_size=200))
def test_connections_closed_without_eof_are_dropped(server: Qubesd, prefix: bytes) -> None:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.paths.qubesd_sock))
        sock.sendall(prefix)
    assert server.call("dom0", "admin.vm.property.Get", "qid").startswith(b"0\0")


WRITE_PROPS = [
    "netvm",
    "label",
    "memory",
    "maxmem",
    "vcpus",
    "debug",
    "template",
    "default_dispvm",
    "kernelopts",
    "default_user",
    "virt_mode",
    "mac",
    "ip",
    "provides_network",
    "template_for_dispvms",
    "devices_denied",
    "name",
    "qid",
    "klass",
]


@settings(max_examples=200)
@given(
    prop=st.sampled_from(WRITE_PROPS),
    dest=st.sampled_from(["work", "ai-egress", "debian-13-xfce", "dom0"]),
    payload=st.binary(max_size=40)
    | st.sampled_from([b"", b"sys-net", b"work", b"ai-egress", b"none", b"-1", b"0", b"True"]),
)
def test_property_set_is_all_or_nothing(
    server: Qubesd, prop: str, dest: str, payload: bytes
) -> None:
    before = server.snapshot()
    reply = server.call(dest, "admin.vm.property.Set", prop, payload)
    assert _well_formed(reply)
    if reply != b"0\0":
        assert server.snapshot() == before
    else:
        server.call(dest, "admin.vm.property.Reset", prop)  # keep the shared server tidy


@settings(max_examples=150)
@given(
    payload=st.binary(max_size=80)
    | st.from_regex(rb"\A(name|label|pool)=[ -~]{0,12}( [ -~]{0,12})?\Z")
)
def test_create_payload_parser_is_all_or_nothing(server: Qubesd, payload: bytes) -> None:
    before = server.snapshot()
    reply = server.call("dom0", "admin.vm.Create.AppVM", "", payload)
    assert _well_formed(reply)
    if reply == b"0\0":
        name = payload.decode().split("name=", 1)[1].split(" ", 1)[0]
        assert server.call(name, "admin.vm.Remove") == b"0\0"
    assert server.snapshot() == before
