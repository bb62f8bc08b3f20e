"""Revisions of the private volume, kept as R4.3's ``file`` and ``file-reflink`` drivers keep
them (``qubes/storage/file.py``, ``qubes/storage/reflink.py``).

The emulated private volume is a directory (the qube's ``/rw``), not an image, so the images
become directory trees under the qube's directory:

* ``private`` is the volume (R4.3's ``private.img``, the clean image);
* ``private.clean`` is the state at start, made by :func:`on_start` while the sandbox writes
  into ``private`` (R4.3 instead writes into ``private-dirty.img`` and keeps the clean image);
  while it exists the volume is dirty (not cleanly stopped), as R4.3's ``-dirty.img`` is;
* ``file-reflink``: ``private.N@YYYY-MM-DDTHH:MM:SSZ`` are the revisions
  (``private.img.N@…Z``), ``N`` counting up from 1, the time the one the volume was committed
  before (``_add_revision`` takes the clean image's mtime, kept here by ``private.committed``);
* ``file``: ``private.old`` is the one revision (``private-cow.img.old``), listed as ``old``
  with its ctime; ``FileVolume`` has no ``revert``, so Revert is R4.3's unhandled
  ``NotImplementedError`` (an empty reply).

On stop (any stop: shutdown, kill, a sandbox that died) the state at start becomes a revision
when ``revisions_to_keep`` is above 0, and the oldest are pruned to ``revisions_to_keep``
(``ReflinkVolume._commit``, ``FileVolume.commit``). Only the private volume holds data in the
emulator, so every other volume lists no revisions.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd import storage

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import QubesApp
    from qubes_mcp.sim.qubesd.vm import Qube, Volume

VOLUME = "private"
#: ``ReflinkVolume.revisions``' glob ``*?@????-??-??T??:??:??Z``, with a numeric id
_REFLINK_NAME = re.compile(r"private\.(\d+)@(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z")


def isodate(seconds: float) -> str:
    """``qubes.storage.isodate``: UTC, seconds, no offset."""
    return datetime.fromtimestamp(int(seconds), tz=UTC).isoformat().replace("+00:00", "")


def _dir(app: QubesApp, vm: Qube) -> Path:
    return app.paths.qube_dir(vm.name)


def _clean(app: QubesApp, vm: Qube) -> Path:
    return _dir(app, vm) / "private.clean"


def _stamp(app: QubesApp, vm: Qube) -> Path:
    return _dir(app, vm) / "private.committed"


def _keeps(app: QubesApp, vol: Volume) -> bool:
    """A volume whose commits may make revisions: the private volume, saved on stop,
    writable, snapshots not disabled (``revisions_to_keep=-1``), in a filesystem pool."""
    return (
        vol.name == VOLUME
        and vol.save_on_stop
        and vol.rw
        and not vol.snap_on_start
        and vol.revisions_to_keep > 0
        and storage.driver(app, vol) in storage.VARLIBQUBES_DRIVERS
    )


def _skip_special(directory: str, names: list[str]) -> list[str]:
    """Copy only directories, regular files and symlinks (as links): a FIFO or socket the
    qube left in ``/rw`` would block or fail a copy."""
    skipped = []
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            skipped.append(name)
    return skipped


def _copy_tree(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + "~")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True, ignore=_skip_special)
    os.replace(tmp, dst)


def _commit_time(app: QubesApp, vm: Qube) -> float:
    """When the volume was last committed (R4.3: the clean image's mtime)."""
    for candidate in (_stamp(app, vm), _dir(app, vm)):
        try:
            return candidate.stat().st_mtime
        except OSError:
            continue
    return time.time()


def _touch_stamp(app: QubesApp, vm: Qube, when: float | None = None) -> None:
    path = _stamp(app, vm)
    path.touch()
    if when is not None:
        os.utime(path, (when, when))


def revisions(app: QubesApp, vm: Qube, vol: Volume) -> dict[str, str]:
    """``Volume.revisions``: revision id to its time, oldest id first."""
    if vol.name != VOLUME or vm.name not in app.domains:
        return {}
    directory = _dir(app, vm)
    kind = storage.driver(app, vol)
    if kind == storage.FILE:
        old = directory / "private.old"
        return {"old": isodate(old.stat().st_ctime)} if old.is_dir() else {}
    if kind != storage.REFLINK or not directory.is_dir():
        return {}
    found = [m for m in map(_REFLINK_NAME.fullmatch, os.listdir(directory)) if m is not None]
    found.sort(key=lambda m: int(m.group(1)))
    return {m.group(1): m.group(2) for m in found}


def listed(app: QubesApp, vm: Qube, vol: Volume) -> list[str]:
    """``ListSnapshots``' order: by time (a stable sort of the id order)."""
    revs = revisions(app, vm, vol)
    return sorted(revs, key=revs.__getitem__)


def _revision_path(app: QubesApp, vm: Qube, revision: str, timestamp: str) -> Path:
    return _dir(app, vm) / f"private.{revision}@{timestamp}Z"


def _add_revision(app: QubesApp, vm: Qube, vol: Volume, source: Path, *, move: bool) -> None:
    """``ReflinkVolume._add_revision``: the clean state becomes revision ``last + 1``."""
    revs = revisions(app, vm, vol)
    next_id = str(int(list(revs)[-1]) + 1) if revs else "1"
    target = _revision_path(app, vm, next_id, isodate(_commit_time(app, vm)))
    if move:
        os.replace(source, target)
    else:
        _copy_tree(source, target)


def _prune(app: QubesApp, vm: Qube, vol: Volume, keep: int) -> None:
    revs = list(revisions(app, vm, vol).items())
    for revision, timestamp in revs[: -keep or None]:
        shutil.rmtree(_revision_path(app, vm, revision, timestamp), ignore_errors=True)


def on_start(app: QubesApp, vm: Qube) -> None:
    """``Volume.start``: keep the state the qube starts from, the future revision."""
    vol = vm.volumes.get(VOLUME)
    private = app.paths.private_dir(vm.name)
    if vol is None or not _keeps(app, vol) or not private.is_dir():
        return
    _copy_tree(private, _clean(app, vm))


def on_stop(app: QubesApp, vm: Qube) -> None:
    """``Volume.stop``: commit; the state at start becomes a revision, the oldest are
    pruned (``file``: it replaces ``private.old``)."""
    vol = vm.volumes.get(VOLUME)
    if vol is None or not vol.save_on_stop or not vol.rw or vol.snap_on_start:
        return
    if not _dir(app, vm).is_dir():
        return
    clean = _clean(app, vm)
    kind = storage.driver(app, vol)
    if clean.is_dir() and vol.revisions_to_keep > 0 and kind == storage.REFLINK:
        _add_revision(app, vm, vol, clean, move=True)
    elif clean.is_dir() and vol.revisions_to_keep > 0 and kind == storage.FILE:
        old = _dir(app, vm) / "private.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(clean, old)
    shutil.rmtree(clean, ignore_errors=True)
    if kind == storage.REFLINK and vol.revisions_to_keep >= 0:
        _prune(app, vm, vol, vol.revisions_to_keep)
    _touch_stamp(app, vm)


def revert(app: QubesApp, vm: Qube, vol: Volume, revision: str) -> None:
    """``Volume.revert``: ``file-reflink`` swaps the revision in, the current state
    becoming the newest revision; ``file`` and every other driver cannot."""
    kind = storage.driver(app, vol)
    if kind == storage.FILE:
        raise NotImplementedError("Volume FileVolume has revert() not implemented")
    if kind != storage.REFLINK or vol.name != VOLUME:
        raise NotImplementedError("Volume has revert() not implemented")
    if not vm.is_halted() or _clean(app, vm).exists():
        raise exc.StoragePoolException(
            f"Cannot revert: {storage.vid(vm, vol)} is not cleanly stopped"
        )
    source = _revision_path(app, vm, revision, revisions(app, vm, vol)[revision])
    private = app.paths.private_dir(vm.name)
    committed = source.stat().st_mtime
    if vol.revisions_to_keep > 0:
        _add_revision(app, vm, vol, private, move=False)
    aside = _dir(app, vm) / "private.reverting~"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(private, aside)
    os.replace(source, private)
    shutil.rmtree(aside, ignore_errors=True)
    _touch_stamp(app, vm, committed)
