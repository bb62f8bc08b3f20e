"""The remaining R4.3 differences of issue 8 §2, one test per cause.

Each test names the cause (§2 item), states what qubes-core-admin ``release4.3`` does and the
source line it comes from (``git show release4.3:<file>``), on the ``qubes/tests/api_admin.py``
fixture (``dom0``, ``test-template``, ``test-vm1``) or the demo fleet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.qubesd_fixtures import Qubesd, api_admin_app, err, ok


@pytest.fixture(name="q")
def api_admin(tmp_path: Path) -> Iterator[Qubesd]:
    q = Qubesd(api_admin_app(tmp_path / "root")).start()
    try:
        yield q
    finally:
        q.stop()


def _lines(reply: bytes) -> list[str]:
    assert reply.startswith(b"0\0"), reply
    return reply[2:].decode().splitlines()


# --- §2.2 order of the entry-point lists ---------------------------------------------------


def test_entry_point_lists_are_sorted_by_name(q: Qubesd) -> None:
    """admin.py:117-126, 1388-1397 and storage/__init__.py:1125-1130 list
    ``importlib.metadata.entry_points(group=…)`` in file order; setuptools writes
    ``entry_points.txt`` sorted by name (``_entry_points.render``), so every installed dom0
    lists them sorted (``setup.py egg_info`` on release4.3 shows it)."""
    assert _lines(q.call("dom0", "admin.vmclass.List")) == [
        "AdminVM",
        "AppVM",
        "DispVM",
        "RemoteVM",
        "StandaloneVM",
        "TemplateVM",
    ]
    assert _lines(q.call("dom0", "admin.deviceclass.List")) == ["block", "pci"]
    drivers = [line.split(" ")[0] for line in _lines(q.call("dom0", "admin.pool.ListDrivers"))]
    assert drivers == ["callback", "file", "file-reflink", "linux-kernel", "lvm_thin", "zfs"]


# --- §2.4 empty replies where R4.3 has an unhandled exception --------------------------------


def test_create_appvm_on_dom0_is_an_empty_reply(q: Qubesd) -> None:
    """appvm.py:100-104: ``AppVM.__init__`` reads ``template.volume_config``, which
    ``AdminVM`` does not have (AttributeError); nothing is created."""
    before = q.snapshot()
    assert q.call("dom0", "admin.vm.Create.AppVM", "dom0", b"name=new label=red") == b""
    assert q.snapshot() == before


def test_create_without_template_after_default_template_reset_is_an_empty_reply(
    q: Qubesd,
) -> None:
    """app.py:1426-1430: ``add_new_vm`` reads ``self.default_template``, a property without
    default: once reset, an AttributeError."""
    assert q.call("dom0", "admin.property.Reset", "default_template") == ok()
    assert q.call("dom0", "admin.vm.Create.AppVM", "", b"name=new label=red") == b""
    assert "new" not in q.call("dom0", "admin.vm.List").decode()


# --- §2.7 object text in error messages ------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-f]+ ")


def test_errors_embed_the_qube_repr(q: Qubesd) -> None:
    """vm/__init__.py:355-375 ``BaseVM.__repr__``; exc.py:185-191 puts it into ``Invalid
    value None for property 'template' of …``, and vm/__init__.py:703-710 into ``wrong VM
    class: domains[…]`` when the create path passes the qube itself (admin.py:1242)."""
    reply = q.call("test-vm1", "admin.vm.property.Set", "template", b"").decode()
    text = _ADDRESS.sub(" at 0x… ", reply)
    uuid = q.app.domains["test-vm1"].uuid
    assert text == (
        "2\0QubesPropertyValueError\0\0Invalid value None for property 'template' of "
        "<AppVM at 0x… name='test-vm1' qid=2 autostart=False backup_timestamp=None "
        "debug=False default_user=user devices_denied= dns=None gateway=None gateway6=None "
        "icon=appvm-red include_in_backups=True installed_by_rpm=False ip=None ip6=None "
        "kernel=1.0 keyboard_layout=us++ klass=AppVM label=red mac=00:16:3e:5e:6c:00 "
        "maxmem=4000 memory=400 provides_network=False qrexec_timeout=60 "
        "shutdown_timeout=60 start_time=None stubdom_mem=None stubdom_uuid= stubdom_xid=-1 "
        f"template_for_dispvms=False updateable=False uuid={uuid} vcpus=2 virt_mode=pvh "
        "visible_gateway=None visible_gateway6=None visible_ip=None visible_ip6=None "
        "visible_netmask=None xid=-1 audiovm=dom0 bootmode=default default_dispvm=None "
        "guivm=dom0 kernelopts=swiotlb=2048 management_dispvm=None netvm=None "
        "template=test-template>\0"
    )
    reply = q.call("dom0", "admin.vm.Create.AppVM", "test-vm1", b"name=new label=red").decode()
    assert reply.startswith("2\0QubesPropertyValueError\0\0wrong VM class: domains[<AppVM at 0x"), (
        reply
    )
    assert reply.endswith(" template=test-template>] is of type AppVM and not TemplateVM\0")


# --- §2.9 the classes R4.3 lists: AdminVM refused, RemoteVM created -------------------------


def test_create_adminvm_is_refused_by_the_qid_setter(q: Qubesd) -> None:
    """app.py:1439 passes ``qid=`` first; adminvm.py:47-49 makes ``qid`` a
    ``property.forbidden`` (``qubes/__init__.py:465-481``)."""
    assert q.call("dom0", "admin.vm.Create.AdminVM", "", b"name=new label=red") == err(
        "QubesPropertyValueError", "property 'qid' on AdminVM instance cannot be set"
    )


def test_create_remotevm_makes_a_remote_qube(q: Qubesd) -> None:
    """R4.3 creates a RemoteVM (admin.py:1222-1315: not a QubesVM, so nothing on disk); it
    never raises QubesNotImplementedError (exc.py defines it, nothing raises it).
    remotevm.py: always Running, ``start``/``kill``/``suspend`` refuse, ``shutdown`` takes
    no arguments and there is no ``pause``; no volumes, firewall or notes (empty replies);
    ``relayvm`` adds a ``relayvm-`` tag (ext/relay.py) and is in GetSystemInfo
    (internal.py:143-152); a RemoteVM is no ``LocalVM`` for other qubes' VM properties
    (vm/__init__.py:653, 703-710); it can be removed while "Running" (app.py:560-568)."""
    import json

    assert q.call("dom0", "admin.vm.Create.RemoteVM", "", b"name=far label=blue") == ok()
    assert "far class=RemoteVM state=Running uuid=" in q.call("dom0", "admin.vm.List").decode()
    assert _lines(q.call("far", "admin.vm.property.List")) == [
        "icon",
        "include_in_backups",
        "klass",
        "label",
        "name",
        "qid",
        "remote_name",
        "transport_rpc",
        "uuid",
        "relayvm",
    ]
    assert q.call("far", "admin.vm.property.Get", "icon") == ok(
        "default=True type=str remotevm-blue"
    )
    assert q.call("far", "admin.vm.Start") == err(
        "QubesVMNotHaltedError", "Cannot start a RemoteVM."
    )
    assert q.call("far", "admin.vm.Kill") == err("QubesVMError", "Cannot kill a RemoteVM.")
    assert q.call("far", "admin.vm.Suspend") == err("QubesVMError", "Cannot suspend a RemoteVM.")
    for method in ("admin.vm.Shutdown", "admin.vm.Pause", "admin.vm.volume.List"):
        assert q.call("far", method) == b"", method
    assert q.call("far", "admin.vm.firewall.Get") == b""
    assert q.call("far", "admin.vm.notes.Get") == b""
    assert q.call("far", "admin.vm.CurrentState") == ok(
        "mem=0 mem_static_max=0 cputime=0 power_state=Running"
    )
    assert q.call("far", "admin.vm.property.Set", "relayvm", b"test-vm1") == ok()
    assert "relayvm-test-vm1" in _lines(q.call("far", "admin.vm.tag.List"))
    assert q.call("far", "admin.vm.property.Set", "transport_rpc", b"qubesair.SSHProxy") == ok()
    info = json.loads(q.raw(b"internal.GetSystemInfo+ dom0 name dom0\0", internal=True)[2:])
    far = info["domains"]["far"]
    assert (far["type"], far["relayvm"], far["transport_rpc"]) == (
        "RemoteVM",
        "test-vm1",
        "qubesair.SSHProxy",
    )
    assert q.call("test-vm1", "admin.vm.property.Set", "default_dispvm", b"far") == err(
        "QubesPropertyValueError",
        "wrong VM class: domains['far'] is of type RemoteVM and not LocalVM",
    )
    assert q.call("far", "admin.vm.property.Reset", "relayvm") == ok()
    assert q.call("far", "admin.vm.Remove") == ok()
    assert "far" not in q.call("dom0", "admin.vm.List").decode()


# --- §2.3 the varlibqubes pool --------------------------------------------------------------


def test_varlibqubes_pool_reports_size_usage_and_contains_the_kernel_pool(q: Qubesd) -> None:
    """admin.py:697-711: ``size``, ``usage`` (file.py:228-241, statvfs of ``dir_path``) and
    ``included_in`` (kernels.py:217-222 ``search_pool_containing_dir``: ``vm-kernels`` lies
    in ``/var/lib/qubes``); admin.py:733-740 ``UsageDetails`` from ``usage_details``."""
    info = dict(
        line.split("=", 1) for line in _lines(q.call("dom0", "admin.pool.Info", "varlibqubes"))
    )
    assert info["driver"] == "file"
    assert int(info["size"]) > 0 and 0 <= int(info["usage"]) <= int(info["size"])
    assert "included_in" not in info
    details = _lines(q.call("dom0", "admin.pool.UsageDetails", "varlibqubes"))
    assert [line.split("=")[0] for line in details] == ["data_size", "data_usage"]
    assert q.call("dom0", "admin.pool.Info", "linux-kernel") == ok(
        "dir_path=/var/lib/qubes/vm-kernels\ndriver=linux-kernel\nname=linux-kernel\n"
        "included_in=varlibqubes\n"
    )
    assert q.call("dom0", "admin.pool.UsageDetails", "linux-kernel") == ok()


def test_file_driver_volumes_behave_as_file_volumes(q: Qubesd) -> None:
    """R4.3 picks ``file`` for ``varlibqubes`` without reflink (app.py:1355-1364) — the
    recorded volume paths are ``FileVolume.path`` (file.py:549-553). Its volumes refuse
    shrinking and resizing a snapshot (file.py:348-373), ``Clear`` of a volume that is not
    ``save_on_stop`` (file.py:444-450), and more than one revision (file.py:273-279)."""
    assert q.call("test-vm1", "admin.vm.volume.Resize", "private", b"1073741824") == err(
        "StoragePoolException",
        "For your own safety, shrinking of private is disabled. If you really know what you "
        "are doing, use `truncate` on appvms/test-vm1/private manually.",
    )
    assert q.call("test-vm1", "admin.vm.volume.Resize", "root", b"21474836480") == err(
        "StoragePoolException",
        "Cannot resize volume based on a template - resizethe template instead",
    )
    assert q.call("test-vm1", "admin.vm.volume.Clear", "volatile") == err(
        "StoragePoolException",
        "Can not import into save_on_stop=False volume appvms/test-vm1/volatile",
    )
    assert q.call("test-vm1", "admin.vm.volume.Set.revisions_to_keep", "private", b"2") == b""
    assert q.call("test-vm1", "admin.vm.volume.Resize", "private", b"4294967296") == ok()


def test_a_fleet_may_choose_file_reflink_throughout(tmp_path: Path) -> None:
    """reflink.py:173-178: a ``file-reflink`` volume's path is its own ``-dirty.img``;
    reflink.py:349-368 resizes without the shrink check; reflink.py:379-383 refuses
    ``Clear`` of a non-``save_on_stop`` volume with an unhandled NotImplementedError."""
    from qubes_mcp.sim.fleet import load_fleet
    from qubes_mcp.sim.paths import SimPaths

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[pool]\ndriver = "file-reflink"\nsize = 1000000000000\n\n'
        '[[qube]]\nname = "tpl"\nclass = "TemplateVM"\nlabel = "black"\n\n'
        '[[qube]]\nname = "app"\nclass = "AppVM"\nlabel = "red"\ntemplate = "tpl"\n'
    )
    q = Qubesd(load_fleet(fleet, SimPaths(tmp_path / "root"))).start()
    try:
        assert "driver=file-reflink" in _lines(q.call("dom0", "admin.pool.Info", "varlibqubes"))
        info = _lines(q.call("app", "admin.vm.volume.Info", "root"))
        assert "path=/var/lib/qubes/appvms/app/root-dirty.img" in info
        assert q.call("app", "admin.vm.volume.Resize", "private", b"1073741824") == ok()
        assert q.call("app", "admin.vm.volume.Clear", "volatile") == b""
    finally:
        q.stop()


# --- §2.8 admin.pool.volume.List ------------------------------------------------------------


def test_pool_volume_list_has_every_volume_of_the_pool(q: Qubesd) -> None:
    """admin.py:811-822 lists ``pool.volumes``: every volume the pool initialised
    (file.py:127-152 ``init_volume`` appends each one), snapshots such as an AppVM's root
    included."""
    vids = _lines(q.call("dom0", "admin.pool.volume.List", "varlibqubes"))
    assert "appvms/test-vm1/root" in vids
    assert {"appvms/test-vm1/private", "appvms/test-vm1/volatile"} <= set(vids)
    assert "vm-templates/test-template/root" in vids
    assert _lines(q.call("dom0", "admin.pool.volume.List", "linux-kernel")) == ["1.0"]


# --- §2.4 (pools) writable volumes in linux-kernel, kernel volume in a file pool -------------


def test_create_with_a_writable_volume_in_linux_kernel_is_an_empty_reply(q: Qubesd) -> None:
    """kernels.py:172 ``LinuxKernel.init_volume``: ``assert not volume_config["rw"]``;
    qubesvm.py:2937-2938 moves every writable non-snapshot volume with ``pool=``. The
    qube is deleted again (admin.py:1311-1314)."""
    before = _lines(q.call("dom0", "admin.vm.List"))
    for payload in (
        b"name=new label=red pool=linux-kernel",
        b"name=new label=red pool:private=linux-kernel",
    ):
        assert q.call("dom0", "admin.vm.CreateInPool.AppVM", "", payload) == b""
        assert _lines(q.call("dom0", "admin.vm.List")) == before


def test_create_after_default_pool_kernel_reset_is_an_empty_reply(q: Qubesd) -> None:
    """default_pool_kernel then defaults to ``default_pool`` (``file``): the kernel volume
    has no size and ``FileVolume.create`` asserts ``size > 0`` (file.py:282-285)."""
    assert q.call("dom0", "admin.property.Reset", "default_pool_kernel") == ok()
    assert q.call("dom0", "admin.vm.Create.AppVM", "", b"name=new label=red") == b""
    assert "new" not in q.call("dom0", "admin.vm.List").decode()


def test_a_snapshot_volume_cannot_move_pools(q: Qubesd) -> None:
    """qubesvm.py:2941-2950: ``pool:root=`` on an AppVM (root is a snapshot)."""
    assert q.call(
        "dom0", "admin.vm.CreateInPool.AppVM", "", b"name=new label=red pool:root=varlibqubes"
    ) == err(
        "QubesException",
        "Snapshot volume root must be in the same pool as its origin (root volume of "
        "template),cannot move to pool varlibqubes ",
    )
    assert "new" not in q.call("dom0", "admin.vm.List").decode()


# --- §2.6 missing checks (volumes) ----------------------------------------------------------


def test_kernel_volume_refusals(q: Qubesd) -> None:
    """kernels.py ``LinuxModules``: ``ephemeral``, ``rw`` and ``revisions_to_keep`` setters
    refuse; it has no ``resize`` (``Volume.resize``: NotImplementedError, an empty reply)."""
    assert q.call("test-vm1", "admin.vm.volume.Set.ephemeral", "kernel", b"True") == err(
        "QubesValueError", "LinuxModules does not support setting ephemeral value"
    )
    assert q.call("test-vm1", "admin.vm.volume.Set.rw", "kernel", b"True") == err(
        "QubesValueError", "LinuxModules supports only read-only volumes"
    )
    assert q.call("test-vm1", "admin.vm.volume.Set.revisions_to_keep", "kernel", b"1") == err(
        "QubesValueError", "LinuxModules supports only revisions_to_keep=0"
    )
    assert q.call("test-vm1", "admin.vm.volume.Resize", "kernel", b"1024") == b""


def test_ephemeral_only_on_plain_writable_volumes(q: Qubesd) -> None:
    """storage/__init__.py:200-215: enabling ``ephemeral`` on a ``snap_on_start``,
    ``save_on_stop`` or read-only volume is refused (private is ``save_on_stop``)."""
    assert q.call("test-vm1", "admin.vm.volume.Set.ephemeral", "private", b"True") == err(
        "QubesValueError",
        "Cannot enable ephemeral on snap_on_start or save_on_stop or non-dom0 or not "
        "writable volume",
    )
    assert q.call("test-vm1", "admin.vm.volume.Set.ephemeral", "private", b"False") == ok()


# --- §2.10 methods that were missing ---------------------------------------------------------


def test_console_needs_a_running_qube_and_has_no_tty(q: Qubesd) -> None:
    """admin.py:642-657: a halted qube is ``QubesVMNotRunningError``; a running one answers
    the ``<console tty=…>`` of its libvirt XML — an emulated domain has none (empty)."""
    assert q.call("test-vm1", "admin.vm.Console") == err(
        "QubesVMNotRunningError", "Domain not running (either powered off or paused): 'test-vm1'"
    )
    assert q.call("test-vm1", "admin.vm.Start") == ok()
    assert q.call("test-vm1", "admin.vm.Console") == ok()
    assert q.call("test-vm1", "admin.vm.Console", "x") == b""


def test_stats_is_a_stream_of_vm_stats_events(q: Qubesd) -> None:
    """admin.py:2078-2105 and 2029-2073: ``connection-established``, then ``vm-stats`` for
    each running qube with ``memory_kb``, ``cpu_time``, ``cpu_usage``, ``cpu_usage_raw``.
    Without a known sandbox pid the figures are the stub (``memory`` in KiB, no cpu)."""
    import socket

    assert q.call("test-vm1", "admin.vm.Start") == ok()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(q.paths.qubesd_sock))
        sock.sendall(b"admin.vm.Stats+ dom0 name test-vm1\0")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while data.count(b"vm-stats") < 1 or not data.endswith(b"\0\0"):
            data += sock.recv(4096)
    assert data.startswith(b"1\0\0connection-established\0\0")
    assert (
        b"1\x00test-vm1\x00vm-stats\x00memory_kb\x00409600\x00cpu_time\x000\x00"
        b"cpu_usage\x000\x00cpu_usage_raw\x000\x00\x00" in data
    )


def test_stats_reads_a_known_sandbox_process_tree() -> None:
    """The real figures: resident memory and cpu time of a process and its children."""
    import os

    from qubes_mcp.sim.qubesd import stats

    sample = stats.from_processes(os.getpid(), 2)
    assert sample is not None
    assert sample.memory_kb > 1000 and sample.cpu_time_ns > 0 and sample.vcpus == 2
    assert stats.from_processes(2**22 + 1, 1) is None


def test_pool_add_set_remove(q: Qubesd) -> None:
    """admin.py:742-794 (checks), app.py:1468-1509 (``add_pool``/``remove_pool``), admin.py
    823-855 (``Set.revisions_to_keep``/``Set.ephemeral_volatile``)."""
    assert q.call("dom0", "admin.pool.Add", "nope", b"name=p\n") == err(
        "QubesException", "unexpected driver name: nope"
    )
    assert q.call("dom0", "admin.pool.Add", "file", b"name=p\nsize=1\n") == err(
        "QubesException", "unexpected driver options: size"
    )
    assert q.call("dom0", "admin.pool.Add", "file", b"name=p\n") == err(
        "QubesException", "missing required driver options: dir_path"
    )
    assert q.call("dom0", "admin.pool.Add", "file", b"name=p\nname=q\ndir_path=/x\n") == b""
    assert q.call("dom0", "admin.pool.Add", "file", b"name=p\ndir_path=/var/lib/qubes/p\n") == ok()
    assert _lines(q.call("dom0", "admin.pool.List"))[-1] == "p"
    assert "included_in=varlibqubes" in _lines(q.call("dom0", "admin.pool.Info", "p"))
    assert q.call("dom0", "admin.pool.Set.revisions_to_keep", "p", b"0") == ok()
    assert q.call("dom0", "admin.pool.Set.ephemeral_volatile", "p", b"True") == ok()
    assert "ephemeral_volatile=True" in _lines(q.call("dom0", "admin.pool.Info", "p"))
    assert q.call("dom0", "admin.pool.Remove", "varlibqubes") == err(
        "QubesPoolInUseError", "Storage pool is in use: 'varlibqubes'"
    )
    assert q.call("dom0", "admin.pool.Remove", "p") == ok()
    assert "p" not in _lines(q.call("dom0", "admin.pool.List"))


def test_pci_writes_refuse_without_pci_devices(q: Qubesd) -> None:
    """devices.py:181-212 (attach: halted frontend, then an unknown device — a
    ProtocolError, zero bytes), 321-333 (detach), 355-367 (unassign), 278-297
    (``update_assignment``). ``DeviceNotAssigned`` is a KeyError: its text arrives quoted."""
    assert q.call("test-vm1", "admin.vm.device.pci.Attach", "dom0+00_02.0", b"") == err(
        "QubesVMNotRunningError", "VM not running, cannot attach device, do you mean `assign`?"
    )
    assert q.call("test-vm1", "admin.vm.Start") == ok()
    assert q.call("test-vm1", "admin.vm.device.pci.Attach", "dom0+00_02.0", b"") == b""
    assert q.call("test-vm1", "admin.vm.device.pci.Detach", "dom0+00_02.0") == err(
        "DeviceNotAssigned", "'pci device 00_02.0 not attached to test-vm1'"
    )
    assert q.call("test-vm1", "admin.vm.device.pci.Unassign", "dom0+00_02.0") == err(
        "DeviceNotAssigned", "'pci device dom0:00_02.0:* not assigned to test-vm1'"
    )
    assert q.call(
        "test-vm1", "admin.vm.device.pci.Set.assignment", "dom0+00_02.0", b"required"
    ) == err("QubesValueError", "Device dom0:00_02.0:* not assigned to test-vm1")


# --- §2.4 (globals) default_netvm=dom0 is applied halfway ------------------------------------


def test_default_netvm_dom0_is_stored_then_fails(q: Qubesd) -> None:
    """app.py:690-708 lets dom0 through the loop check; after it is stored, app.py:1746-1757
    fires ``property-reset:netvm`` on the first qube on the default, and net.py:640-647
    calls ``dom0.reload_connected_ips`` — AttributeError: an empty reply, value kept."""
    assert q.call("dom0", "admin.property.Set", "default_netvm", b"dom0") == b""
    assert q.call("dom0", "admin.property.Get", "default_netvm") == ok("default=False type=vm dom0")
    # every later set fails the same way (net.py:640-641: dom0 is now the old value), and
    # is applied all the same
    assert q.call("dom0", "admin.property.Set", "default_netvm", b"") == b""
    assert q.call("dom0", "admin.property.Get", "default_netvm") == ok("default=False type=vm ")


# --- §2.5 values that propagate -------------------------------------------------------------


def test_default_guivm_and_audiovm_retag_qubes_on_the_default(q: Qubesd) -> None:
    """ext/gui.py:120-131, ext/audio.py:143-154: setting the global default fires
    ``property-set:guivm``/``audiovm`` on every qube left at the default, which re-tags it
    (gui.py:67-80)."""
    assert q.call("dom0", "admin.vm.Create.AppVM", "test-template", b"name=gui label=red") == ok()
    assert q.call("dom0", "admin.property.Set", "default_guivm", b"gui") == ok()
    assert q.call("dom0", "admin.property.Set", "default_audiovm", b"gui") == ok()
    tags = _lines(q.call("test-vm1", "admin.vm.tag.List"))
    assert "guivm-gui" in tags and "audiovm-gui" in tags
    assert "guivm-dom0" not in tags and "audiovm-dom0" not in tags


def test_hvm_without_qrexec_has_no_memory_balancing(q: Qubesd) -> None:
    """qubesvm.py:277-280 and 1965-1995: an HVM qube whose template chain does not
    announce qrexec cannot balance memory: ``maxmem`` defaults to 0."""
    assert q.call("test-vm1", "admin.vm.property.Set", "virt_mode", b"hvm") == ok()
    assert q.call("test-vm1", "admin.vm.property.Get", "maxmem") == ok("default=True type=int 0")
    assert q.call("test-template", "admin.vm.feature.Set", "qrexec", b"1") == ok()
    assert q.call("test-vm1", "admin.vm.property.Get", "maxmem") == ok("default=True type=int 4000")


def test_check_updates_vm_false_marks_new_qubes(q: Qubesd) -> None:
    """qubesvm.py:1186-1190: a new qube gets ``check-updates`` = False ("") when the
    global ``check_updates_vm`` is off."""
    assert q.call("dom0", "admin.property.Set", "check_updates_vm", b"False") == ok()
    assert q.call("dom0", "admin.vm.Create.AppVM", "", b"name=new label=red") == ok()
    assert q.call("new", "admin.vm.feature.Get", "check-updates") == ok("")


def test_kernel_volume_after_default_kernel_reset_and_empty_kernel(q: Qubesd) -> None:
    """kernels.py ``LinuxModules.vid`` reads ``vm.kernel``: with ``default_kernel`` reset
    (app.py:884-888, no default) that is an AttributeError, an empty reply; with
    ``kernel=''`` the vid and the path are empty."""
    assert q.call("test-vm1", "admin.vm.property.Set", "kernel", b"") == ok()
    info = _lines(q.call("test-vm1", "admin.vm.volume.Info", "kernel"))
    assert "vid=" in info and "path=" in info
    assert q.call("test-vm1", "admin.vm.property.Reset", "kernel") == ok()
    assert q.call("dom0", "admin.property.Reset", "default_kernel") == ok()
    assert q.call("test-vm1", "admin.vm.volume.Info", "kernel") == b""


def test_dom0_icon_does_not_depend_on_its_label(q: Qubesd) -> None:
    """adminvm.py ``icon``: a constant ``adminvm-black``, also once the label is reset;
    internal.py ``get_system_info`` reads ``label.icon`` unguarded: an empty reply."""
    assert q.call("dom0", "admin.vm.property.Reset", "label") == ok()
    assert q.call("dom0", "admin.vm.property.Get", "icon") == ok(
        "default=True type=str adminvm-black"
    )
    assert q.raw(b"internal.GetSystemInfo+ dom0 name dom0\0", internal=True) == b""


# --- §2.6 missing checks (properties, features) ----------------------------------------------


def test_keyboard_layout_format(q: Qubesd) -> None:
    """qubesvm.py:188-218 ``_setter_kbd_layout``."""
    for value, why in (
        (b"us", "invalid number of keyboard layout parameters"),
        (b"u1++", "Invalid keyboard layout provided"),
        (b"us+a b+", "Invalid layout variant provided"),
        (b"us++a;b", "Invalid layout options provided"),
    ):
        reply = q.call("test-vm1", "admin.vm.property.Set", "keyboard_layout", value)
        assert reply.startswith(b"2\0QubesPropertyValueError\0\0") and reply.endswith(
            why.encode() + b"\0"
        ), (value, reply)
    assert q.call("test-vm1", "admin.vm.property.Set", "keyboard_layout", b"de+neo+") == ok()


def test_kernel_name_without_slash(q: Qubesd) -> None:
    """qubesvm.py:69-81 ``_setter_kernel``."""
    reply = q.call("test-vm1", "admin.vm.property.Set", "kernel", b"../x")
    assert reply.startswith(b"2\0QubesPropertyValueError\0\0")
    assert reply.endswith(b"Kernel name cannot contain '/'\0")


def test_preload_dispvm_max_needs_qrexec_and_the_rpc(q: Qubesd) -> None:
    """dvmtemplate.py:210-236: ``preload-dispvm-max`` on a qube whose template chain lacks
    qrexec, then the ``qubes.WaitForRunningSystem`` RPC, then digits."""
    set_max = ("admin.vm.feature.Set", "preload-dispvm-max")
    assert q.call("test-vm1", *set_max, b"1") == err(
        "QubesValueError", "Qube does not support qrexec"
    )
    assert q.call("test-template", "admin.vm.feature.Set", "qrexec", b"1") == ok()
    assert q.call("test-vm1", *set_max, b"1") == err(
        "QubesValueError", "Qube does not support the RPC 'qubes.WaitForRunningSystem'"
    )
    rpc = "supported-rpc.qubes.WaitForRunningSystem"
    assert q.call("test-template", "admin.vm.feature.Set", rpc, b"1") == ok()
    assert q.call("test-vm1", *set_max, b"x") == err(
        "QubesValueError", "Invalid preload-dispvm-max value: not a digit"
    )
    assert q.call("test-vm1", *set_max, b"2") == ok()


def test_stats_reports_the_sandbox_process_tree_when_its_pid_is_known(q: Qubesd) -> None:
    """The hook for long-lived sandboxes: ``QubesApp.sandbox_pid`` gives the sandbox's pid,
    and ``vm-stats`` then carries that process tree's resident memory, not the stub."""
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        q.app.sandbox_pid = lambda name: child.pid if name == "test-vm1" else None
        assert q.call("test-vm1", "admin.vm.Start") == ok()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(q.paths.qubesd_sock))
            sock.sendall(b"admin.vm.Stats+ dom0 name test-vm1\0")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while b"vm-stats" not in data or not data.endswith(b"\0\0"):
                data += sock.recv(4096)
        fields = data.split(b"vm-stats\0", 1)[1].split(b"\0")
        memory_kb = int(fields[fields.index(b"memory_kb") + 1])
        assert memory_kb != 409600 and 1000 < memory_kb < 1_000_000
    finally:
        child.kill()
        child.wait()


def test_stats_prefers_the_sandbox_cgroup(tmp_path: Path) -> None:
    """A sandbox in a cgroup of its own is measured by that cgroup's accounting (v2 and
    v1); one that shares the emulator's cgroup is not (the figures would be ours)."""
    from qubes_mcp.sim.qubesd import stats

    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    for pid, v2 in (("self", "/emu"), ("7", "/emu/qube-work"), ("8", "/emu")):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cgroup").write_text(f"0::{v2}\n")
    (root / "emu/qube-work").mkdir(parents=True)
    (root / "emu/qube-work/memory.current").write_text("2097152\n")
    (root / "emu/qube-work/cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\n")
    assert stats.from_cgroup(7, 2, proc=proc, root=root) == stats.Sample(2048, 1_500_000, 2)
    assert stats.from_cgroup(8, 2, proc=proc, root=root) is None
    (proc / "9").mkdir()
    (proc / "self" / "cgroup").write_text("4:memory:/emu\n2:cpuacct:/emu\n0::/\n")
    (proc / "9" / "cgroup").write_text("4:memory:/emu/q\n2:cpuacct:/emu/q\n0::/\n")
    (root / "memory/emu/q").mkdir(parents=True)
    (root / "memory/emu/q/memory.usage_in_bytes").write_text("4096\n")
    (root / "cpuacct/emu/q").mkdir(parents=True)
    (root / "cpuacct/emu/q/cpuacct.usage").write_text("123456\n")
    assert stats.from_cgroup(9, 1, proc=proc, root=root) == stats.Sample(4, 123456, 1)


def test_notes_keep_what_libqubes_pure_allows(q: Qubesd) -> None:
    """admin.py:2134-2167 keeps a character if ``qubes_pure_code_point_safe_for_display``
    (or tab/newline), else ``_``; libqubes-pure's test program: Greek, Cyrillic, CJK and
    quotation marks are safe; NBSP, U+200D, U+FE0F, U+26A0, emoji and cuneiform are not
    (api_admin.py:2276-2282 checks ``\\b\\xa0\\u200b\\u200c\\u200d`` becomes ``_____``)."""
    safe = "β Ж 中 \U00020000 \u201cq\u201d\t\n"
    unsafe = "\b\xa0\u200b\u200c\u200d\ufe0f\u26a0\U0001f642\U00012000"
    text = safe + unsafe
    assert q.call("test-vm1", "admin.vm.notes.Set", "", text.encode()) == ok()
    assert q.call("test-vm1", "admin.vm.notes.Get") == ok(safe + "_" * len(unsafe))
