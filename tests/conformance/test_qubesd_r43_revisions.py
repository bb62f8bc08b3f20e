"""Volume revisions (``admin.vm.volume.ListSnapshots``/``Revert``) as R4.3 keeps them.

R4.3 sources (``git show release4.3:<file>``): ``qubes/api/admin.py``
``vm_volume_listsnapshots`` (ids sorted by time) and ``vm_volume_revert`` (unknown revision:
``enforce``, zero bytes; then the permission event with the revision); ``qubes/storage/
reflink.py`` (``_commit`` on stop: the clean image becomes revision ``last+1`` named
``N@ISODATEZ``, pruned to ``revisions_to_keep``; ``revert`` refuses a dirty volume with
``StoragePoolException`` and keeps the current state as a new revision);
``qubes/storage/file.py`` (one ``old`` revision; ``FileVolume`` has no ``revert``: an
unhandled ``NotImplementedError``, zero bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qubesd import lifecycle
from qubes_mcp.sim.qubesd.app import QubesApp
from tests.qubesd_fixtures import Qubesd, err, ok

VM = "work"


def _app(root: Path, driver: str) -> QubesApp:
    app = QubesApp.new(SimPaths(root), pool_driver=driver)
    app.autosave = False
    app.props["default_kernel"] = "1.0"
    app.props["default_netvm"] = None
    tpl = lifecycle.create_vm(app, "TemplateVM", "tpl", app.label_by_name("black"))
    app.props["default_template"] = "tpl"
    app.props["default_pool"] = "varlibqubes"
    for vm in (tpl, lifecycle.create_vm(app, "AppVM", VM, app.label_by_name("red"), tpl)):
        lifecycle.create_on_disk(app, vm)
    app.autosave = True
    return app


@pytest.fixture(name="reflink")
def reflink_fixture(tmp_path: Path) -> Iterator[Qubesd]:
    q = Qubesd(_app(tmp_path / "root", "file-reflink")).start()
    try:
        yield q
    finally:
        q.stop()


@pytest.fixture(name="file")
def file_fixture(tmp_path: Path) -> Iterator[Qubesd]:
    q = Qubesd(_app(tmp_path / "root", "file")).start()
    try:
        yield q
    finally:
        q.stop()


def _private(q: Qubesd) -> Path:
    return q.paths.private_dir(VM)


def _run(q: Qubesd, write: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> None:
    """One run of the qube: start, change its /rw, shut down."""
    assert q.call(VM, "admin.vm.Start") == ok()
    for name, text in (write or {}).items():
        (_private(q) / name).write_text(text)
    for name in remove:
        (_private(q) / name).unlink()
    assert q.call(VM, "admin.vm.Shutdown") == ok()


def _snapshots(q: Qubesd, volume: str = "private") -> list[str]:
    reply = q.call(VM, "admin.vm.volume.ListSnapshots", volume)
    assert reply.startswith(b"0\0"), reply
    return reply[2:].decode().splitlines()


def _files(q: Qubesd) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(_private(q).iterdir())}


def test_a_fresh_volume_has_no_revisions(reflink: Qubesd) -> None:
    assert _snapshots(reflink) == []


def test_reflink_stop_keeps_the_state_at_start_as_revision_1(reflink: Qubesd) -> None:
    (_private(reflink) / "a").write_text("before")
    _run(reflink, write={"a": "after"})
    assert _snapshots(reflink) == ["1"]
    names = [n for n in os.listdir(reflink.paths.qube_dir(VM)) if n.startswith("private.1@")]
    assert len(names) == 1
    assert re.fullmatch(r"private\.1@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", names[0])
    assert (reflink.paths.qube_dir(VM) / names[0] / "a").read_text() == "before"
    assert _files(reflink) == {"a": "after"}


def test_reflink_prunes_to_revisions_to_keep(reflink: Qubesd) -> None:
    """The volume's revisions_to_keep is the pool's (1): each stop replaces the revision;
    with 2, the two newest ids stay."""
    _run(reflink)
    _run(reflink)
    assert _snapshots(reflink) == ["2"]
    assert reflink.call(VM, "admin.vm.volume.Set.revisions_to_keep", "private", b"2") == ok()
    _run(reflink)
    _run(reflink)
    assert _snapshots(reflink) == ["3", "4"]


def test_reflink_revisions_to_keep_0_keeps_none_and_prunes(reflink: Qubesd) -> None:
    _run(reflink)
    assert reflink.call(VM, "admin.vm.volume.Set.revisions_to_keep", "private", b"0") == ok()
    _run(reflink)
    assert _snapshots(reflink) == []


def test_a_kill_commits_too(reflink: Qubesd) -> None:
    assert reflink.call(VM, "admin.vm.Start") == ok()
    assert reflink.call(VM, "admin.vm.Kill") == ok()
    assert _snapshots(reflink) == ["1"]


def test_revert_restores_the_revision_and_keeps_the_current_state(reflink: Qubesd) -> None:
    _run(reflink, write={"keep": "1"})
    _run(reflink, write={"late": "x"}, remove=("keep",))
    assert _snapshots(reflink) == ["2"]
    assert _files(reflink) == {"late": "x"}
    assert reflink.call(VM, "admin.vm.volume.Revert", "private", b"2") == ok()
    assert _files(reflink) == {"keep": "1"}
    # the state reverted from is now the newest revision (ReflinkVolume.revert)
    assert _snapshots(reflink) == ["3"]
    assert reflink.call(VM, "admin.vm.volume.Revert", "private", b"3\n") == ok()
    assert _files(reflink) == {"late": "x"}


def test_revert_of_a_running_qube_is_refused(reflink: Qubesd) -> None:
    _run(reflink)
    assert reflink.call(VM, "admin.vm.Start") == ok()
    (_private(reflink) / "new").write_text("y")
    reply = reflink.call(VM, "admin.vm.volume.Revert", "private", b"1")
    assert reply == err(
        "StoragePoolException", "Cannot revert: appvms/work/private is not cleanly stopped"
    )
    assert _files(reflink) == {"new": "y"}


@pytest.mark.parametrize("revision", [b"123", b"", b"old", b"1@2020", b"../1"])
def test_an_unknown_revision_is_zero_bytes_and_changes_nothing(
    reflink: Qubesd, revision: bytes
) -> None:
    _run(reflink, write={"a": "b"})
    before = _files(reflink)
    assert reflink.call(VM, "admin.vm.volume.Revert", "private", revision) == b""
    assert _files(reflink) == before
    assert _snapshots(reflink) == ["1"]


def test_other_volumes_list_no_revisions(reflink: Qubesd) -> None:
    _run(reflink)
    for volume in ("root", "volatile", "kernel"):
        assert _snapshots(reflink, volume) == []
    assert reflink.call(VM, "admin.vm.volume.ListSnapshots", "nope") == b""


def test_a_fifo_in_rw_does_not_block_the_commit(reflink: Qubesd) -> None:
    os.mkfifo(_private(reflink) / "pipe")
    (_private(reflink) / "f").write_text("z")
    _run(reflink)
    assert _snapshots(reflink) == ["1"]


def test_file_driver_keeps_one_old_revision_and_cannot_revert(file: Qubesd) -> None:
    (_private(file) / "a").write_text("before")
    _run(file, write={"a": "after"})
    _run(file)
    assert _snapshots(file) == ["old"]
    assert file.call(VM, "admin.vm.volume.Revert", "private", b"old") == b""
    assert _files(file) == {"a": "after"}
    assert file.call(VM, "admin.vm.volume.Set.revisions_to_keep", "private", b"2") == b""
