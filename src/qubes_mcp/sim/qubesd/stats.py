"""Memory and cpu figures of an emulated qube, for ``admin.vm.Stats``.

A running emulated qube is a sandbox whose processes live in this host's process table.
When the emulator knows the sandbox's pid (``QubesApp.sandbox_pid``, set by the part that
starts sandboxes), the figures are real: if the sandbox runs in a cgroup of its own (the
cgroup freezer's, say), that cgroup's memory and cpu accounting (v2 ``memory.current`` and
``cpu.stat``, or v1 ``memory.usage_in_bytes`` and ``cpuacct.usage``); else the resident
memory and cpu time of that process and all its descendants, read from ``/proc``.
Otherwise — the sandbox is not long-lived, or the qube is dom0 — they are a stub: the
qube's ``memory`` property and no cpu time, so clients still see every running qube.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import QubesApp
    from qubes_mcp.sim.qubesd.vm import Qube

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Sample:
    memory_kb: int
    cpu_time_ns: int
    vcpus: int


def _stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, utime+stime ticks, rss pages)`` of one process, None if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # after the comm: state ppid … utime(12) stime(13) … rss(22), 0-based from state
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from one scan of ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def from_processes(root: int, vcpus: int) -> Sample | None:
    """Figures summed over the process tree under ``root`` (None if ``root`` is gone)."""
    if _stat(root) is None:
        return None
    ticks = rss = 0
    for pid in process_tree(root):
        st = _stat(pid)
        if st is not None:
            ticks += st[1]
            rss += st[2]
    return Sample(rss * _PAGE // 1024, ticks * 1_000_000_000 // _TICKS, vcpus)


def _cgroups(pid: int | str, proc: Path) -> dict[str, str]:
    """Controller (``""`` for the v2 hierarchy) -> cgroup path, from ``/proc/PID/cgroup``."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _read_int(path: Path, key: str | None = None) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0])
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def from_cgroup(
    pid: int, vcpus: int, *, proc: Path = _PROC, root: Path = Path("/sys/fs/cgroup")
) -> Sample | None:
    """Figures of the sandbox's own cgroup; None when it shares the emulator's (then the
    numbers would be the whole emulator's) or the accounting files are not there."""
    theirs, ours = _cgroups(pid, proc), _cgroups("self", proc)
    v2 = theirs.get("")
    if v2 is not None and v2 not in ("/", ours.get("")):
        for base in (root / v2.lstrip("/"), root / "unified" / v2.lstrip("/")):
            memory = _read_int(base / "memory.current")
            usec = _read_int(base / "cpu.stat", "usage_usec")
            if memory is not None and usec is not None:
                return Sample(memory // 1024, usec * 1000, vcpus)
    mem_path, cpu_path = theirs.get("memory"), theirs.get("cpuacct")
    if mem_path and cpu_path and (mem_path, cpu_path) != (ours.get("memory"), ours.get("cpuacct")):
        memory = _read_int(root / "memory" / mem_path.lstrip("/") / "memory.usage_in_bytes")
        nsec = _read_int(root / "cpuacct" / cpu_path.lstrip("/") / "cpuacct.usage")
        if memory is not None and nsec is not None:
            return Sample(memory // 1024, nsec, vcpus)
    return None


def sample(app: QubesApp, vm: Qube) -> Sample:
    vcpus = int(vm.get("vcpus", 1)) if vm.has_prop("vcpus") else 1
    pid = app.sandbox_pid(vm.name) if app.sandbox_pid is not None else None
    if pid is not None:
        real = from_cgroup(pid, vcpus) or from_processes(pid, vcpus)
        if real is not None:
            return real
    return Sample(int(vm.get("memory", 4096)) * 1024, 0, vcpus)


def cpu_usage_raw(
    before: Sample | None, after: Sample, before_time: float | None, now: float
) -> int:
    """``get_vm_stats``: cpu time over wall time between two samples, in %; 0 at first."""
    if before is None or before_time is None or now <= before_time:
        return 0
    used = (after.cpu_time_ns - before.cpu_time_ns) / 1e9
    return max(round(used * 100 / (now - before_time)), 0)
