"""The real ``qubesadmin`` client library, unmodified, against the emulated qubesd (R4.3).

Each test drives the client the way ``qvm-*`` tools do and asserts the answer, or the exact
exception class, that a real R4.3 dom0 gives. Run with::

    QUBESADMIN_SRC=/tmp/qsrc/qubes-core-admin-client \\
        .venv/bin/python -m pytest tests/fidelity -x --timeout 300

Mismatches found are listed in docs/fidelity.md.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import pytest

DEMO_QUBES = {
    "dom0": "AdminVM",
    "debian-13-xfce": "TemplateVM",
    "sys-net": "AppVM",
    "sys-firewall": "AppVM",
    "sys-usb": "AppVM",
    "work": "AppVM",
    "vault": "AppVM",
    "default-dvm": "AppVM",
}


def exc_name(info: pytest.ExceptionInfo[BaseException]) -> str:
    """The client-side class name: the wire name qubesd sent (or the client's own class)."""
    return type(info.value).__name__


# --- listing and properties ----------------------------------------------------------------


def test_list_qubes_with_classes(qapp: Any) -> None:
    names = {vm.name: vm.klass for vm in qapp.domains}
    for name, klass in DEMO_QUBES.items():
        assert names.get(name) == klass
    assert "work" in qapp.domains
    assert "nosuch" not in qapp.domains


def test_unknown_qube_is_vm_not_found(qapp: Any, qubesadmin: ModuleType) -> None:
    with pytest.raises(KeyError):
        qapp.domains["nosuch"]
    with pytest.raises(qubesadmin.exc.QubesVMNotFoundError):
        qapp.qubesd_call("nosuch", "admin.vm.property.Get", "label")


def test_read_properties_and_defaults(qapp: Any) -> None:
    work = qapp.domains["work"]
    assert work.label.name == "blue"
    assert str(work.template) == "debian-13-xfce"
    assert work.netvm is None
    assert not work.property_is_default("netvm")
    assert work.property_is_default("memory")
    assert isinstance(work.memory, int)
    assert work.property_get_default("memory") == work.memory
    assert qapp.default_template.name == "debian-13-xfce"
    assert str(qapp.domains["sys-firewall"].netvm) == "sys-net"
    assert qapp.domains["dom0"].klass == "AdminVM"


def test_set_and_reset_property(qapp: Any) -> None:
    work = qapp.domains["work"]
    default = work.memory
    work.memory = default + 100
    assert qapp.domains["work"].memory == default + 100
    assert not work.property_is_default("memory")
    del work.memory  # admin.vm.property.Reset
    assert work.memory == default
    assert work.property_is_default("memory")
    work.netvm = "sys-firewall"
    assert str(qapp.domains["work"].netvm) == "sys-firewall"
    work.netvm = qapp.domains["work"].property_get_default("netvm")
    work.netvm = None
    assert work.netvm is None


def test_reset_via_default_sentinel(qapp: Any, qubesadmin: ModuleType) -> None:
    work = qapp.domains["work"]
    work.vcpus = 3
    work.vcpus = qubesadmin.DEFAULT
    assert work.property_is_default("vcpus")


@pytest.mark.parametrize(
    ("prop", "value", "error"),
    [
        ("netvm", "work", "QubesValueError"),  # not a network-providing qube
        ("netvm", "nosuch", "QubesPropertyValueError"),  # VMProperty: non-existing qube
        ("memory", "-5", "QubesPropertyValueError"),
        ("label", "nosuchcolour", "QubesLabelNotFoundError"),
        ("template", "work", "QubesPropertyValueError"),  # VMProperty: wrong VM class
    ],
    ids=["netvm-not-network", "netvm-unknown", "memory-negative", "label-unknown", "bad-template"],
)
def test_invalid_property_values_raise_r43_classes(
    qapp: Any, prop: str, value: str, error: str
) -> None:
    work = qapp.domains["work"]
    with pytest.raises(Exception) as info:
        setattr(work, prop, value)
    assert exc_name(info) == error


def test_netvm_loop_is_refused(qapp: Any, qubesadmin: ModuleType) -> None:
    with pytest.raises(qubesadmin.exc.QubesValueError):
        qapp.domains["sys-net"].netvm = "sys-firewall"
    assert qapp.domains["sys-net"].netvm is None


def test_write_once_property_gets_empty_response(qapp: Any, qubesadmin: ModuleType) -> None:
    # R4.3 raises AttributeError for a write-once property: not reported, zero bytes.
    with pytest.raises(qubesadmin.exc.QubesDaemonAccessError):
        qapp.domains["work"].name = "work2"
    assert "work" in qapp.domains


def test_unknown_property_is_attribute_error(qapp: Any) -> None:
    with pytest.raises(AttributeError):
        qapp.domains["work"].nosuchproperty  # noqa: B018


def test_global_property_set_and_reset(qapp: Any) -> None:
    qapp.default_netvm = "sys-net"
    assert str(qapp.default_netvm) == "sys-net"
    qapp.default_netvm = "sys-firewall"
    assert str(qapp.default_netvm) == "sys-firewall"


# --- tags and features ---------------------------------------------------------------------


def test_tags(qapp: Any, qubesadmin: ModuleType) -> None:
    work = qapp.domains["work"]
    work.tags.add("project-x")
    assert "project-x" in qapp.domains["work"].tags
    work.tags.remove("project-x")
    assert "project-x" not in work.tags
    with pytest.raises(qubesadmin.exc.QubesTagNotFoundError):
        work.tags.remove("project-x")
    work.tags.discard("project-x")  # no error


def test_features(qapp: Any, qubesadmin: ModuleType) -> None:
    work = qapp.domains["work"]
    work.features["service.cups"] = "1"
    assert qapp.domains["work"].features["service.cups"] == "1"
    assert "service.cups" in list(work.features)
    assert work.features.get("nosuch", "fallback") == "fallback"
    del work.features["service.cups"]
    with pytest.raises(qubesadmin.exc.QubesFeatureNotFoundError):
        work.features["service.cups"]
    tmpl = qapp.domains["debian-13-xfce"]
    assert tmpl.features.get("os") == "Linux"
    assert work.features.check_with_template("os") == "Linux"


# --- power ---------------------------------------------------------------------------------


def test_start_shutdown_kill_and_their_errors(qapp: Any, qubesadmin: ModuleType) -> None:
    vault = qapp.domains["vault"]
    assert vault.get_power_state() == "Halted"
    with pytest.raises(qubesadmin.exc.QubesVMNotStartedError) as info:
        vault.shutdown()
    assert exc_name(info) == "QubesVMNotStartedError"
    with pytest.raises(qubesadmin.exc.QubesVMNotStartedError) as info:
        vault.kill()
    assert exc_name(info) == "QubesVMNotStartedError"
    with pytest.raises(qubesadmin.exc.QubesVMNotRunningError):
        vault.pause()
    vault.start()
    assert vault.get_power_state() == "Running"
    assert vault.is_running()
    vault.start()  # already running: silently OK in R4.3
    with pytest.raises(qubesadmin.exc.QubesVMNotPausedError):
        vault.unpause()
    vault.pause()
    assert vault.get_power_state() == "Paused"
    vault.unpause()
    vault.shutdown()
    assert vault.get_power_state() in ("Halted", "Dying")
    vault.start()
    vault.kill()
    assert vault.get_power_state() == "Halted"


def test_dom0_cannot_be_started_or_removed(qapp: Any, qubesadmin: ModuleType) -> None:
    with pytest.raises(qubesadmin.exc.QubesVMNotHaltedError):
        qapp.domains["dom0"].start()
    with pytest.raises(qubesadmin.exc.QubesVMError) as info:
        qapp.domains["dom0"].kill()
    assert exc_name(info) == "QubesVMError"
    # R4.3 calls AdminVM.shutdown(force=…, wait=…), a TypeError: zero bytes.
    with pytest.raises(qubesadmin.exc.QubesDaemonAccessError):
        qapp.domains["dom0"].shutdown()
    with pytest.raises(qubesadmin.exc.QubesVMInUseError):
        del qapp.domains["dom0"]


def test_netvm_with_running_clients_needs_force(qapp: Any, qubesadmin: ModuleType) -> None:
    sys_net = qapp.domains["sys-net"]
    assert sys_net.is_running()  # autostart, sys-firewall (running) uses it
    with pytest.raises(qubesadmin.exc.QubesVMInUseError):
        sys_net.shutdown()


# --- create, remove, disposables, clone ----------------------------------------------------


def test_create_appvm_from_template_and_remove(qapp: Any, qubesadmin: ModuleType) -> None:
    vm = qapp.add_new_vm("AppVM", name="fid-new", label="red", template="debian-13-xfce")
    assert vm.name == "fid-new"
    assert "fid-new" in qapp.domains
    assert str(qapp.domains["fid-new"].template) == "debian-13-xfce"
    assert qapp.domains["fid-new"].label.name == "red"
    assert "created-by-dom0" in qapp.domains["fid-new"].tags
    with pytest.raises(qubesadmin.exc.QubesException):
        qapp.add_new_vm("AppVM", name="fid-new", label="red", template="debian-13-xfce")
    with pytest.raises(qubesadmin.exc.QubesVMNotFoundError):
        qapp.add_new_vm("AppVM", name="fid-two", label="red", template="nosuch")
    with pytest.raises(qubesadmin.exc.QubesLabelNotFoundError):
        qapp.add_new_vm("AppVM", name="fid-two", label="nosuch", template="debian-13-xfce")
    del qapp.domains["fid-new"]
    assert "fid-new" not in qapp.domains


def test_remove_refusals(qapp: Any, qubesadmin: ModuleType) -> None:
    with pytest.raises(qubesadmin.exc.QubesVMNotHaltedError):
        del qapp.domains["sys-firewall"]  # running
    with pytest.raises(qubesadmin.exc.QubesVMInUseError):
        del qapp.domains["debian-13-xfce"]  # template of others
    assert "debian-13-xfce" in qapp.domains


def test_create_disposable(qapp: Any, qubesadmin: ModuleType) -> None:
    wrapper = qubesadmin.vm.DispVM.from_appvm(qapp, "default-dvm")
    wrapper.create_disposable()
    name = wrapper.name
    assert name.startswith("disp")
    disp = qapp.domains[name]
    assert disp.klass == "DispVM"
    assert str(disp.template) == "default-dvm"
    assert disp.auto_cleanup is True
    with pytest.raises(qubesadmin.exc.QubesException):
        qubesadmin.vm.DispVM.from_appvm(qapp, "work").create_disposable()


def test_clone_copies_properties_tags_features_firewall(
    qapp: Any, qubesadmin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 8 of clone_vm runs the local dom0 tool qvm-appmenus (not an Admin API call);
    # stand in for it, and for the non-root dom0 user it runs as.
    appmenus: list[list[str]] = []
    monkeypatch.setattr(qubesadmin.app.os, "getuid", lambda: 1000)
    monkeypatch.setattr(
        qubesadmin.app.subprocess, "check_output", lambda argv, **_: appmenus.append(argv)
    )
    work = qapp.domains["work"]
    work.tags.add("project-x")
    work.features["service.cups"] = "1"
    work.vcpus = 3
    work.firewall.rules = [
        qapp_rule(qapp, "action=accept dsthost=qubes-os.org"),
        qapp_rule(qapp, "action=drop"),
    ]
    clone = qapp.clone_vm(work, "work-clone")
    assert clone.name == "work-clone"
    clone = qapp.domains["work-clone"]
    assert clone.vcpus == 3
    assert "project-x" in clone.tags
    assert clone.features.get("service.cups") == "1"
    assert [r.rule for r in clone.firewall.rules] == [
        "action=accept dsthost=qubes-os.org",
        "action=drop",
    ]
    assert clone.label.name == "blue"
    assert appmenus == [["qvm-appmenus", "--init", "--update", "--source", "work", "work-clone"]]


# --- firewall ------------------------------------------------------------------------------


def qapp_rule(qapp: Any, text: str) -> Any:
    import qubesadmin.firewall

    return qubesadmin.firewall.Rule(text)


def test_firewall_default_and_replace(qapp: Any, qubesadmin: ModuleType) -> None:
    work = qapp.domains["work"]
    assert [r.rule for r in work.firewall.rules] == ["action=accept"]
    rules = [
        qubesadmin.firewall.Rule(
            None, action="accept", dsthost="10.0.0.0/8", proto="tcp", dstports="443"
        ),
        qubesadmin.firewall.Rule(None, action="accept", specialtarget="dns"),
        qubesadmin.firewall.Rule(
            None, action="accept", proto="icmp", icmptype="8", comment="ping out"
        ),
        qubesadmin.firewall.Rule(None, action="drop", expire=str(int(time.time()) + 3600)),
        qubesadmin.firewall.Rule(None, action="drop"),
    ]
    work.firewall.rules = rules
    got = qapp.domains["work"].firewall.rules
    assert [r.action for r in got] == ["accept", "accept", "accept", "drop", "drop"]
    assert got[0] == rules[0]
    assert str(got[2].comment) == "ping out"
    # On the wire, qubesd's own key order (the client re-renders in its order).
    raw = qapp.qubesd_call("work", "admin.vm.firewall.Get").decode().splitlines()
    assert raw[0] == "action=accept dst4=10.0.0.0/8 proto=tcp dstports=443-443"
    assert raw[2] == "action=accept proto=icmp icmptype=8 comment=ping out"
    assert got[3].expire is not None
    work.firewall.reload()


def test_firewall_invalid_rules_get_empty_response(qapp: Any, qubesadmin: ModuleType) -> None:
    before = qapp.qubesd_call("work", "admin.vm.firewall.Get")
    with pytest.raises(qubesadmin.exc.QubesDaemonAccessError):
        qapp.qubesd_call("work", "admin.vm.firewall.Set", None, b"action=accept protoxyz=tcp\n")
    # The client accepts a relative "+N" expire (qvm-firewall converts it first); R4.3 qubesd
    # refuses the '+' ("strange characters in rule"), so a raw one fails the same way.
    with pytest.raises(qubesadmin.exc.QubesDaemonAccessError):
        qapp.domains["work"].firewall.rules = [
            qubesadmin.firewall.Rule(None, action="drop", expire="+3600")
        ]
    assert qapp.qubesd_call("work", "admin.vm.firewall.Get") == before


# --- labels, pools, volumes ----------------------------------------------------------------


def test_labels(qapp: Any, qubesadmin: ModuleType) -> None:
    names = list(qapp.labels)  # the collection iterates over names
    assert names[:8] == ["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"]
    assert qapp.labels["red"].color == "0xcc0000"
    assert qapp.labels["red"].index == 1
    with pytest.raises(KeyError):
        qapp.labels["nosuch"]


def test_pools_and_volumes(qapp: Any) -> None:
    assert "varlibqubes" in qapp.pools
    pool = qapp.pools["varlibqubes"]
    assert pool.size > 0
    assert pool.usage >= 0
    work = qapp.domains["work"]
    assert set(work.volumes) >= {"root", "private", "volatile"}
    private = work.volumes["private"]
    assert private.pool == "varlibqubes"
    size = private.size
    private.resize(size + 1024**3)
    assert qapp.domains["work"].volumes["private"].size == size + 1024**3


# --- block devices -------------------------------------------------------------------------


def _start_sys_usb(qapp: Any) -> Any:
    sys_usb = qapp.domains["sys-usb"]
    if not sys_usb.is_running():
        sys_usb.start()
    return sys_usb


def test_block_devices_list_attach_detach(qapp: Any, qubesadmin: ModuleType) -> None:
    from qubesadmin.device_protocol import DeviceAssignment

    sys_usb = _start_sys_usb(qapp)
    devices = list(sys_usb.devices["block"])
    assert [d.port_id for d in devices] == ["sda"]
    dev = devices[0]
    assert dev.backend_domain.name == "sys-usb"
    assert dev.devclass == "block"
    assert dev.attachment is None
    work = qapp.domains["work"]
    work.start()
    work.devices["block"].attach(DeviceAssignment(dev))
    attached = list(work.devices["block"].get_attached_devices())
    assert [(a.backend_domain.name, a.port_id) for a in attached] == [("sys-usb", "sda")]
    assert attached[0].options.get("frontend-dev") == "xvdi"
    assert sys_usb.devices["block"]["sda"].attachment.name == "work"
    vault = qapp.domains["vault"]
    vault.start()
    with pytest.raises(qubesadmin.exc.DeviceAlreadyAttached):
        vault.devices["block"].attach(DeviceAssignment(dev))
    work.devices["block"].detach(attached[0])
    assert list(work.devices["block"].get_attached_devices()) == []
    with pytest.raises(qubesadmin.exc.DeviceNotAssigned):
        work.devices["block"].detach(attached[0])


def test_block_attach_to_halted_qube_is_not_running(qapp: Any, qubesadmin: ModuleType) -> None:
    from qubesadmin.device_protocol import DeviceAssignment

    dev = next(iter(_start_sys_usb(qapp).devices["block"]))
    with pytest.raises(qubesadmin.exc.QubesVMNotRunningError):
        qapp.domains["vault"].devices["block"].attach(DeviceAssignment(dev))


def test_block_devices_of_halted_backend_are_invisible(qapp: Any) -> None:
    assert list(qapp.domains["sys-usb"].devices["block"]) == []


def test_usb_devices_list_attach_detach(qapp: Any, qubesadmin: ModuleType) -> None:
    """The usb class (R4.3's USB proxy) through the client's generic device collection."""
    from qubesadmin.device_protocol import DeviceAssignment

    sys_usb = _start_sys_usb(qapp)
    devices = list(sys_usb.devices["usb"])
    assert [(d.port_id, d.devclass) for d in devices] == [("1-1", "usb")]
    dev = devices[0]
    assert (dev.vendor, dev.product, dev.attachment) == (
        "Logitech, Inc.",
        "Unifying Receiver",
        None,
    )
    work = qapp.domains["work"]
    if not work.is_running():
        work.start()
    work.devices["usb"].attach(DeviceAssignment(dev))
    attached = list(work.devices["usb"].get_attached_devices())
    assert [(a.backend_domain.name, a.port_id) for a in attached] == [("sys-usb", "1-1")]
    assert sys_usb.devices["usb"]["1-1"].attachment.name == "work"
    with pytest.raises(qubesadmin.exc.DeviceAlreadyAttached):
        work.devices["usb"].attach(DeviceAssignment(dev))
    work.devices["usb"].detach(attached[0])
    assert list(work.devices["usb"].get_attached_devices()) == []
    with pytest.raises(qubesadmin.exc.DeviceNotAssigned):
        work.devices["usb"].detach(attached[0])


def test_device_classes(qapp: Any) -> None:
    assert "block" in list(qapp.domains["work"].devices.keys())


# --- events --------------------------------------------------------------------------------


def test_events_dispatcher_sees_power_and_property_events(
    qapp: Any, qubesadmin: ModuleType
) -> None:
    import qubesadmin.events

    seen: list[tuple[str | None, str, dict[str, str]]] = []

    async def scenario() -> None:
        dispatcher = qubesadmin.events.EventsDispatcher(qapp, enable_cache=False)
        connected = asyncio.Event()
        started = asyncio.Event()

        def handler(subject: Any, event: str, **kwargs: str) -> None:
            seen.append((None if subject is None else str(subject), event, kwargs))
            if event == "connection-established":
                connected.set()
            if event == "domain-start" and str(subject) == "vault":
                started.set()

        dispatcher.add_handler("*", handler)
        task = asyncio.create_task(dispatcher.listen_for_events(reconnect=False))
        try:
            await asyncio.wait_for(connected.wait(), 10)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, qapp.domains["vault"].start)
            await loop.run_in_executor(None, setattr, qapp.domains["work"], "vcpus", 3)
            await asyncio.wait_for(started.wait(), 10)
            await asyncio.sleep(0)  # let already-received events reach the handler
        finally:
            task.cancel()

    asyncio.run(scenario())
    events = [(s, e) for s, e, _ in seen]
    assert events[0] == (None, "connection-established")
    assert ("vault", "domain-pre-start") in events
    assert events.index(("vault", "domain-pre-start")) < events.index(("vault", "domain-start"))


def test_events_carry_kwargs_the_client_deserializes(qapp: Any, qubesadmin: ModuleType) -> None:
    import qubesadmin.events
    from qubesadmin.device_protocol import DeviceAssignment, DeviceInfo, Port

    _start_sys_usb(qapp)
    qapp.domains["work"].start()
    got: dict[str, dict[str, Any]] = {}

    async def scenario() -> None:
        dispatcher = qubesadmin.events.EventsDispatcher(qapp, enable_cache=False)
        connected = asyncio.Event()
        done = asyncio.Event()

        def handler(subject: Any, event: str, **kwargs: Any) -> None:
            if event == "connection-established":
                connected.set()
            got[event] = kwargs
            if event == "device-detach:block":
                done.set()

        for name in (
            "connection-established",
            "property-set:vcpus",
            "device-attach:block",
            "device-detach:block",
        ):
            dispatcher.add_handler(name, handler)
        task = asyncio.create_task(dispatcher.listen_for_events(reconnect=False))
        try:
            await asyncio.wait_for(connected.wait(), 10)
            loop = asyncio.get_running_loop()
            work = qapp.domains["work"]
            await loop.run_in_executor(None, setattr, work, "vcpus", 3)
            dev = next(iter(qapp.domains["sys-usb"].devices["block"]))
            await loop.run_in_executor(None, work.devices["block"].attach, DeviceAssignment(dev))
            attached = next(iter(work.devices["block"].get_attached_devices()))
            await loop.run_in_executor(None, work.devices["block"].detach, attached)
            await asyncio.wait_for(done.wait(), 10)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert got["property-set:vcpus"]["name"] == "vcpus"
    assert got["property-set:vcpus"]["newvalue"] == "3"
    device = got["device-attach:block"]["device"]
    assert isinstance(device, DeviceInfo)  # the client resolved "sys-usb:sda::None"
    assert (device.backend_domain.name, device.port_id) == ("sys-usb", "sda")
    port = got["device-detach:block"]["port"]
    assert isinstance(port, Port)
    assert (port.backend_domain.name, port.port_id) == ("sys-usb", "sda")


def test_backend_life_cycle_events_reach_the_client(qapp: Any, qubesadmin: ModuleType) -> None:
    import qubesadmin.events
    from qubesadmin.device_protocol import DeviceAssignment

    qapp.domains["work"].start()
    seen: list[tuple[str, str]] = []

    async def scenario() -> None:
        dispatcher = qubesadmin.events.EventsDispatcher(qapp, enable_cache=False)
        connected = asyncio.Event()
        removed = asyncio.Event()

        def handler(subject: Any, event: str, **kwargs: Any) -> None:
            seen.append((str(subject), event))
            if event == "connection-established":
                connected.set()
            if event == "device-removed:block":
                removed.set()

        dispatcher.add_handler("*", handler)
        task = asyncio.create_task(dispatcher.listen_for_events(reconnect=False))
        try:
            await asyncio.wait_for(connected.wait(), 10)
            loop = asyncio.get_running_loop()
            sys_usb = qapp.domains["sys-usb"]
            await loop.run_in_executor(None, sys_usb.start)
            dev = next(iter(sys_usb.devices["block"]))
            work = qapp.domains["work"]
            await loop.run_in_executor(None, work.devices["block"].attach, DeviceAssignment(dev))
            await loop.run_in_executor(None, qapp.domains["work"].firewall.reload)
            await loop.run_in_executor(None, sys_usb.kill)
            await asyncio.wait_for(removed.wait(), 10)
            await asyncio.sleep(0)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert ("sys-usb", "device-added:block") in seen
    assert ("work", "firewall-changed") in seen
    removed_at = seen.index(("sys-usb", "device-removed:block"))
    assert ("work", "device-detach:block") in seen[removed_at:]
    assert list(qapp.domains["work"].devices["block"].get_attached_devices()) == []


# --- R4.3 methods added after the first fidelity run (docs/fidelity.md) -------------------
def test_volume_revisions_listing(qapp: Any) -> None:
    assert list(qapp.domains["work"].volumes["private"].revisions) == []


def test_volume_set_revisions_to_keep(qapp: Any) -> None:
    qapp.domains["work"].volumes["private"].revisions_to_keep = 2
    assert qapp.domains["work"].volumes["private"].revisions_to_keep == 2


def test_pool_drivers(qapp: Any) -> None:
    assert "file-reflink" in qapp.pool_drivers


def test_block_assign_auto_attach_and_unassign(qapp: Any, qubesadmin: ModuleType) -> None:
    from qubesadmin.device_protocol import AssignmentMode, DeviceAssignment

    dev = next(iter(_start_sys_usb(qapp).devices["block"]))
    work = qapp.domains["work"]
    work.devices["block"].assign(DeviceAssignment(dev, mode="auto-attach"))
    assigned = list(work.devices["block"].get_assigned_devices())
    assert [(a.port_id, a.mode.value) for a in assigned] == [("sda", "auto-attach")]
    with pytest.raises(qubesadmin.exc.DeviceAlreadyAssigned):
        work.devices["block"].assign(DeviceAssignment(dev, mode="auto-attach"))
    work.start()  # auto-attach on start
    attached = list(work.devices["block"].get_attached_devices())
    assert [(a.port_id, a.mode.value) for a in attached] == [("sda", "auto-attach")]
    work.devices["block"].update_assignment(dev, AssignmentMode.REQUIRED)
    with pytest.raises(qubesadmin.exc.QubesVMNotHaltedError):
        work.devices["block"].detach(attached[0])
    work.devices["block"].unassign(assigned[0])
    assert list(work.devices["block"].get_assigned_devices()) == []
    work.devices["block"].assign(DeviceAssignment(dev, mode="required"))
    qapp.domains["sys-usb"].kill()
    with pytest.raises(qubesadmin.exc.QubesVMInUseError):  # devices assigned elsewhere
        del qapp.domains["sys-usb"]


def test_devices_denied_add(qapp: Any) -> None:
    from qubesadmin.device_protocol import DeviceInterface

    qapp.domains["work"].devices.deny(DeviceInterface("b******"))
    assert qapp.domains["work"].devices_denied == "b******"


def test_property_help(qapp: Any, qubesadmin: ModuleType) -> None:
    # R4.3 sends the property's docstring; ours describes the property (docs/fidelity.md)
    assert qapp.domains["work"].property_help("netvm")
    assert qapp.property_help("default_netvm")
    with pytest.raises(qubesadmin.exc.QubesNoSuchPropertyError):
        qapp.domains["work"].property_help("no_such_property")


def test_suspend_halted_is_not_running(qapp: Any, qubesadmin: ModuleType) -> None:
    with pytest.raises(qubesadmin.exc.QubesVMNotRunningError):
        qapp.domains["vault"].suspend()
