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


# --- §2.9 classes the emulator does not create ----------------------------------------------


def test_create_adminvm_is_refused_by_the_qid_setter(q: Qubesd) -> None:
    """app.py:1439 passes ``qid=`` first; adminvm.py:47-49 makes ``qid`` a
    ``property.forbidden`` (``qubes/__init__.py:465-481``)."""
    assert q.call("dom0", "admin.vm.Create.AdminVM", "", b"name=new label=red") == err(
        "QubesPropertyValueError", "property 'qid' on AdminVM instance cannot be set"
    )
