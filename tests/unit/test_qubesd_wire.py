"""qubesd framing: what reaches a handler, what is refused with zero bytes, and that a refused
request changes nothing and the server keeps serving (R4.3 ``QubesDaemonProtocol``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.qubesd_fixtures import Qubesd, demo_fixture, err, ok  # noqa: F401 - fixture

ZERO = b""

MALFORMED = {
    "no NUL at all": b"admin.vm.List+ dom0 name dom0",
    "three header fields": b"admin.vm.List+ dom0 name\0",
    "dest type keyword default": b"admin.vm.List+ dom0 keyword default\0",
    "dest type keyword dom0": b"admin.vm.List+ dom0 keyword dom0\0",
    "dest type uuid": b"admin.vm.List+ dom0 uuid dom0\0",
    "empty request": b"",
    "only a NUL": b"\0",
    "space in argument": b"admin.vm.tag.Set+a b dom0 name work\0",
    "unknown method": b"admin.vm.NoSuchMethod+ dom0 name dom0\0",
    "non-ASCII method": b"admin.vm.List\xff+ dom0 name dom0\0",
    "non-ASCII argument": b"admin.vm.property.Get+n\xe9tvm dom0 name work\0",
    "payload to a no-payload method": b"admin.vm.List+ dom0 name dom0\0x",
    "argument to admin.vm.List": b"admin.vm.List+x dom0 name dom0\0",
    "bad Shutdown mode": b"admin.vm.Shutdown+now dom0 name work\0",
    "unknown volume": b"admin.vm.volume.Info+swap dom0 name work\0",
    "global property with VM dest": b"admin.property.Get+default_netvm dom0 name work\0",
    "write-once property": b"admin.vm.property.Set+name dom0 name work\0evil",
    "invalid tag charset": b"admin.vm.tag.Set+a=b dom0 name work\0",
    "created-by tag from a qube": b"admin.vm.tag.Set+created-by-dom0 work name work\0",
    "prohibited feature": b"admin.vm.feature.Set+preload-dispvm dom0 name work\0x",
    "non-ASCII feature value": b"admin.vm.feature.Set+x dom0 name work\0\xc3\xa9",
    "Create without label": b"admin.vm.Create.AppVM+ dom0 name dom0\0name=x",
    "Create with unknown key": b"admin.vm.Create.AppVM+ dom0 name dom0\0name=x label=red k=v",
    "Create with duplicate key": b"admin.vm.Create.AppVM+ dom0 name dom0\0name=x label=red name=y",
    "Create with numeric label": b"admin.vm.Create.AppVM+ dom0 name dom0\0name=x label=1",
    "Create on a qube dest": b"admin.vm.Create.AppVM+ dom0 name work\0name=x label=red",
    "CloneTo with unknown token": b"admin.vm.volume.CloneTo+private dom0 name work\0nosuchtoken",
    "firewall rule with unknown key": b"admin.vm.firewall.Set+ dom0 name work\0action=accept x=y",
    "firewall of dom0": b"admin.vm.firewall.Get+ dom0 name dom0\0",
    "notes of dom0": b"admin.vm.notes.Get+ dom0 name dom0\0",
    "oversized notes": b"admin.vm.notes.Set+ dom0 name work\0" + b"a" * 60000 + b"\xff",
    "resize with leading zero": b"admin.vm.volume.Resize+private dom0 name work\0" + b"0123",
    "dom0 shutdown": b"admin.vm.Shutdown+ dom0 name dom0\0",
}


@pytest.mark.parametrize("request_bytes", list(MALFORMED.values()), ids=list(MALFORMED))
def test_refused_with_zero_bytes_and_nothing_changes(demo: Qubesd, request_bytes: bytes) -> None:
    before = demo.snapshot()
    assert demo.raw(request_bytes) == ZERO
    assert demo.snapshot() == before
    assert demo.call("dom0", "admin.vm.property.Get", "qid", src="dom0").startswith(b"0\0")


REPORTED = {
    "unknown dest": (
        b"admin.vm.List+ dom0 name nosuch\0",
        err("QubesVMNotFoundError", "No such domain: 'nosuch'"),
    ),
    "invalid dest name": (
        b"admin.vm.List+ dom0 name 0bad\0",
        err("QubesValueError", "VM name cannot start with hyphen, underscore, dot or numbers"),
    ),
    "short uuid dest": (
        b"admin.vm.List+ dom0 name uuid:1234\0",
        err("QubesVMInvalidUUIDError", "VM UUID is not valid: '1234'"),
    ),
    "uppercase uuid dest": (
        b"admin.vm.List+ dom0 name uuid:ABCDEF01-0000-0000-0000-000000000000\0",
        err(
            "QubesVMInvalidUUIDError",
            "VM UUID is not valid: 'ABCDEF01-0000-0000-0000-000000000000'",
        ),
    ),
    "unknown source": (
        b"admin.vm.List+ nosuch name dom0\0",
        err("QubesVMNotFoundError", "No such domain: 'nosuch'"),
    ),
    "unknown method on unknown dest (dest decoded first)": (
        b"admin.vm.Nope+ dom0 name nosuch\0",
        err("QubesVMNotFoundError", "No such domain: 'nosuch'"),
    ),
    "unknown property": (
        b"admin.vm.property.Get+nosuch dom0 name work\0",
        err("QubesNoSuchPropertyError", "Invalid property 'nosuch' of work"),
    ),
    "non-network netvm": (
        b"admin.vm.property.Set+netvm dom0 name work\0vault",
        err("QubesValueError", "The vault qube does not provide network"),
    ),
    "netvm loop": (
        b"admin.vm.property.Set+netvm dom0 name sys-net\0sys-firewall",
        err("QubesValueError", "Loops in network are unsupported"),
    ),
    "netvm to missing qube": (
        b"admin.vm.property.Set+netvm dom0 name work\0ghost",
        err("QubesPropertyValueError", "Can't set netvm to non-existing qube ghost"),
    ),
    "bad bool": (
        b"admin.vm.property.Set+debug dom0 name work\0maybe",
        err("QubesValueError", "Invalid literal for boolean property: 'maybe'"),
    ),
    "bad int": (
        b"admin.vm.property.Set+memory dom0 name work\0lots",
        err("QubesValueError", "Failed to parse property value as int"),
    ),
    "zero memory": (
        b"admin.vm.property.Set+memory dom0 name work\x000",
        err("QubesPropertyValueError", "memory must be positive"),
    ),
    "stateless property": (
        b"admin.vm.property.Set+klass dom0 name work\0AppVM",
        err("QubesPropertyValueError", "property 'klass' on AppVM instance cannot be set"),
    ),
    "unknown label": (
        b"admin.vm.property.Set+label dom0 name work\0pink",
        err("QubesLabelNotFoundError", "Label does not exist: pink"),
    ),
    "template of wrong class": (
        b"admin.vm.property.Set+template dom0 name work\0vault",
        err(
            "QubesPropertyValueError",
            "wrong VM class: domains['vault'] is of type AppVM and not TemplateVM",
        ),
    ),
    "existing name on create": (
        b"admin.vm.Create.AppVM+ dom0 name dom0\0name=work label=red",
        err("QubesValueError", "VM work already exists"),
    ),
    "template arg on StandaloneVM": (
        b"admin.vm.Create.StandaloneVM+debian-13-xfce dom0 name dom0\0name=x label=red",
        err("QubesValueError", "StandaloneVM cannot be based on template"),
    ),
    "reserved name": (
        b"admin.vm.Create.AppVM+ dom0 name dom0\0name=default label=red",
        err("QubesValueError", "VM name cannot be 'none' nor 'default'"),
    ),
    "name ending -dm": (
        b"admin.vm.Create.AppVM+ dom0 name dom0\0name=evil-dm label=red",
        err("QubesValueError", "VM name cannot end with -dm"),
    ),
    "long name": (
        b"admin.vm.Create.AppVM+ dom0 name dom0\0name=" + b"a" * 32 + b" label=red",
        err("QubesValueError", "VM name must be shorter than 32 characters"),
    ),
    "disposable of a non-dvm": (
        b"admin.vm.CreateDisposable+ dom0 name work\0",
        err(
            "QubesException",
            "Refusing to create disposable out of app qube which has template_for_dispvms=False",
        ),
    ),
    "bad CreateDisposable payload": (
        b"admin.vm.CreateDisposable+ dom0 name default-dvm\0name",
        err(
            "QubesValueError",
            "Invalid payload for admin.vm.CreateDisposable: expected the empty string or 'uuid'",
        ),
    ),
    "remove dom0": (
        b"admin.vm.Remove+ dom0 name dom0\0",
        err("QubesVMInUseError", "'dom0' cannot be removed"),
    ),
    "remove a referenced template": (
        b"admin.vm.Remove+ dom0 name debian-13-xfce\0",
        err(
            "QubesVMInUseError",
            "Domain is in use: 'debian-13-xfce';  see 'journalctl -u qubesd -e' in dom0 for "
            "details",
        ),
    ),
    "missing tag": (
        b"admin.vm.tag.Remove+nosuch dom0 name work\0",
        err("QubesTagNotFoundError", "Tag not set for domain work: nosuch"),
    ),
    "missing feature": (
        b"admin.vm.feature.Get+nosuch dom0 name work\0",
        err("QubesFeatureNotFoundError", "Feature not set for domain work: nosuch"),
    ),
    "bad feature name": (
        b"admin.vm.feature.Set+a/b dom0 name work\0x",
        err("QubesValueError", "feature name contains illegal characters"),
    ),
    "unknown label lookup": (
        b"admin.label.Get+pink dom0 name dom0\0",
        err("QubesValueError", ""),
    ),
}


@pytest.mark.parametrize("case", list(REPORTED.values()), ids=list(REPORTED))
def test_reported_errors_are_byte_exact_and_change_nothing(
    demo: Qubesd, case: tuple[bytes, bytes]
) -> None:
    request_bytes, expected = case
    before = demo.snapshot()
    assert demo.raw(request_bytes) == expected
    assert demo.snapshot() == before


def test_oversized_request_is_aborted_and_server_keeps_serving(demo: Qubesd) -> None:
    big = b"admin.vm.notes.Set+ dom0 name work\0" + b"x" * 70000
    assert demo.raw(big) == ZERO
    assert demo.call("work", "admin.vm.notes.Get") == ok("")


def test_request_at_the_cap_is_served(demo: Qubesd) -> None:
    header = b"admin.vm.notes.Set+ dom0 name work\0"
    assert demo.raw(header + b"n" * (65536 - len(header))) == ok()
    assert demo.call("work", "admin.vm.notes.Get") == ok("n" * (65536 - len(header)))


def test_keyword_adminvm_is_dom0(demo: Qubesd) -> None:
    assert demo.raw(b"admin.vm.List+ dom0 keyword adminvm\0") == demo.call("dom0", "admin.vm.List")


def test_uuid_dest_reaches_the_qube(demo: Qubesd) -> None:
    uuid = demo.on_loop(lambda: demo.app.domains["work"].uuid)
    assert demo.call(f"uuid:{uuid}", "admin.vm.property.Get", "name") == ok(
        "default=False type=str work"
    )


def test_method_without_plus_has_empty_argument(demo: Qubesd) -> None:
    assert demo.raw(b"admin.vm.List dom0 name dom0\0") == demo.call("dom0", "admin.vm.List")


def test_record_lists_handled_requests(demo: Qubesd) -> None:
    demo.call("work", "admin.vm.feature.Set", "x", b"1")
    last = demo.on_loop(lambda: demo.app.record[-1])
    assert (last.method, last.arg, last.src, last.dest, last.payload) == (
        "admin.vm.feature.Set",
        "x",
        "dom0",
        "work",
        b"1",
    )


def test_stale_socket_is_replaced_live_one_is_not(tmp_path: Path) -> None:
    from qubes_mcp.sim.qubesd.server import cleanup_socket
    from tests.qubesd_fixtures import demo_app

    app = demo_app(tmp_path / "root")
    q = Qubesd(app).start()
    try:
        with pytest.raises(FileExistsError):
            cleanup_socket(app.paths.qubesd_sock)
    finally:
        q.stop()
    if app.paths.qubesd_sock.exists():  # left behind, nobody listening: stale
        cleanup_socket(app.paths.qubesd_sock)
    assert not app.paths.qubesd_sock.exists()
    q2 = Qubesd(app).start()  # and a new server can bind again
    try:
        assert q2.call("dom0", "admin.vm.List").startswith(b"0\0dom0 class=AdminVM state=Running")
    finally:
        q2.stop()


def test_vm_list_puts_dom0_first_then_names(demo: Qubesd) -> None:
    """R4.3's ``QubesVM.__lt__`` is never true against AdminVM, so dom0 leads the list."""
    lines = demo.call("dom0", "admin.vm.List")[2:].decode().splitlines()
    names = [line.split(" ", 1)[0] for line in lines]
    assert names[0] == "dom0"
    assert names[1:] == sorted(names[1:])
    assert lines[0] == "dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000"


def test_sockets_are_group_rw_only(demo: Qubesd) -> None:
    import stat

    for path in (demo.paths.qubesd_sock, demo.paths.qubesd_internal_sock):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
