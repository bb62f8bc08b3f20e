"""Start-up recovery's rules (dom0/recovery.py) against a scripted qubesd: which qube a
journal entry may remove, and what each request's ``interrupted`` line says."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import cast

import pytest

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.audit.log import AuditLog
from qubes_mcp.dom0.config import GateConfig
from qubes_mcp.dom0.enrolment import Registry, registry_path
from qubes_mcp.dom0.recovery import Recovery
from tests.enrolment_helpers import uuid_of
from tests.gate_fixtures import CONFIG_TEXT, config

RID = "0123456789abcdef"


class FakeQubesd:
    """Just enough of qubesd: qubes with tags and a class; records removals."""

    def __init__(self, qubes: dict[str, tuple[str, set[str]]]) -> None:
        self.qubes = qubes
        self.removed: list[str] = []

    async def lines(self, dest: str, method: str, arg: str = "") -> list[str]:
        assert method == "admin.vm.tag.List"
        if dest not in self.qubes:
            raise QubesdError("QubesVMNotFoundError", dest)
        return sorted(self.qubes[dest][1])

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        if dest not in self.qubes:
            raise QubesdError("QubesVMNotFoundError", dest)
        if method == "admin.vm.property.Get" and arg == "uuid":
            return f"default=False type=str {uuid_of(dest)}"
        if method == "admin.vm.property.Get":
            return f"default=False type=str {self.qubes[dest][0]}"
        if method == "admin.vm.CurrentState":
            return "power_state=Halted"
        if method == "admin.vm.Remove":
            self.removed.append(dest)
            del self.qubes[dest]
            return ""
        if method == "admin.vm.tag.Remove":
            self.qubes[dest][1].discard(arg)
            return ""
        raise AssertionError(method)


def _journal(tmp_path: Path, op: str, targets: list[str]) -> AuditLog:
    """An audit log whose last line is request RID's ``pending``: the gate died after it."""
    log = AuditLog(tmp_path / "audit.log")
    log.append(
        principal="mcp-control",
        op=op,
        decision="allowed",
        outcome="pending",
        targets=targets,
        request_id=RID,
    )
    return log


def _config(
    tmp_path: Path, registered: tuple[str, ...] = (), line: Path | None = None
) -> GateConfig:
    """The test configuration with its registry under ``tmp_path``, ``registered`` enrolled,
    and ``line`` as dom0's qrexec-client when given."""
    extra = f'qrexec_client = "{line}"\n' if line else ""
    cfg = config(CONFIG_TEXT + f'\n[paths]\nstate_dir = "{tmp_path}/state"\n{extra}')
    registry = Registry()
    for name in registered:
        registry = registry.enrolled("ai", name, uuid_of(name), "AppVM", by="gate:mcp-control")
    path = registry_path(cfg.paths.state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(registry.to_bytes())
    return cfg


def _recover(
    tmp_path: Path,
    op: str,
    targets: list[str],
    qubes: dict[str, tuple[str, set[str]]],
    registered: tuple[str, ...] = (),
) -> tuple[FakeQubesd, dict[str, object]]:
    log = _journal(tmp_path, op, targets)
    fake = FakeQubesd(qubes)
    recovery = Recovery(_config(tmp_path, registered), cast(AdminClient, fake), log)
    assert len(asyncio.run(recovery.reconcile())) == 1
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert (last["request_id"], last["outcome"]) == (RID, "interrupted")
    return fake, last["detail"]


MARK = f"qubes-mcp-birth-{RID}"
IN_SCOPE = {"ai-managed", "ai-exec", "ai-owner-mcp-control"}


@pytest.mark.parametrize(
    ("tags", "registered", "removed", "reason"),
    [
        ({MARK}, False, True, "removed ai-new"),  # marked, out of scope: half-born
        ({MARK, *IN_SCOPE}, False, True, "removed ai-new"),  # marked: never finished
        ({MARK, *IN_SCOPE}, True, True, "removed ai-new"),  # registered, marker not yet off
        (set(), False, True, "removed ai-new"),  # created, not yet marked
        ({"created-by-dom0"}, False, True, "removed ai-new"),  # qubesd's own tag is no claim
        (IN_SCOPE, True, False, "kept ai-new (birth complete)"),
        ({"ai-managed"}, True, False, "kept ai-new (birth complete)"),
        # scope tags but no registration: not this request's finished birth (registration
        # comes before the marker is removed), e.g. one the operator unenrolled since
        (IN_SCOPE, False, False, "nothing to do (ai-new is not this"),
        ({"qubes-mcp-birth-ffffffffffffffff"}, False, False, "nothing to do (ai-new is not this"),
        ({"ai-exec"}, False, False, "nothing to do (ai-new is not this"),  # someone's scope tag
    ],
)
def test_a_create_is_undone_only_when_the_journal_and_the_qube_say_it_is_ours(
    tmp_path: Path, tags: set[str], registered: bool, removed: bool, reason: str
) -> None:
    fake, detail = _recover(
        tmp_path,
        "qube.create",
        ["ai-debian", "ai-new"],
        {"ai-new": ("AppVM", set(tags))},
        ("ai-new",) if registered else (),
    )
    assert fake.removed == (["ai-new"] if removed else [])
    assert str(detail["reason"]).startswith(reason)
    if removed:
        assert detail["rolled_back"] is True


def test_a_create_that_never_made_its_qube_has_nothing_to_undo(tmp_path: Path) -> None:
    fake, detail = _recover(tmp_path, "qube.clone", ["ai-build", "ai-new"], {})
    assert fake.removed == [] and detail["reason"] == "nothing to do (ai-new was not created)"


@pytest.mark.parametrize("op", ["disposable.create", "disposable.run"])
def test_a_disposable_is_found_by_the_name_its_request_gave_it(tmp_path: Path, op: str) -> None:
    mine = f"disp-mcp-{RID}"
    qubes = {mine: ("DispVM", set(IN_SCOPE)), "disp-mcp-ffffffffffffffff": ("DispVM", set())}
    fake, detail = _recover(tmp_path, op, ["ai-dvm"], qubes)
    assert fake.removed == [mine] and detail["reason"] == f"removed {mine}"
    # a qube of that name that is not a disposable is not ours to remove
    fake, detail = _recover(tmp_path / "b", op, ["ai-dvm"], {mine: ("AppVM", set())})
    assert fake.removed == []


def test_a_consent_never_answered_is_recorded_and_nothing_is_touched(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append(
        principal="mcp-control",
        op="qube.remove",
        decision="allowed",
        outcome="pending",
        targets=["ai-usb"],
        request_id=RID,
        detail={"consent": "asked"},
    )
    fake = FakeQubesd({"ai-usb": ("AppVM", set(IN_SCOPE))})
    asyncio.run(Recovery(config(), cast(AdminClient, fake), log).reconcile())
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert last["detail"] == {"consent": "unanswered", "reason": "consent never answered"}
    assert fake.removed == []
    # a second start finds nothing open
    assert asyncio.run(Recovery(config(), cast(AdminClient, fake), log).reconcile()) == []


def test_a_birth_whose_rollback_failed_is_swept_once_while_the_gate_serves(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path / "audit.log")
    for outcome, detail in (("pending", {}), ("failed", {"rolled_back": False})):
        log.append(
            principal="mcp-control",
            op="qube.create",
            decision="allowed",
            outcome=outcome,
            targets=["ai-debian", "ai-new"],
            request_id=RID,
            detail=detail,
        )
    fake = FakeQubesd({"ai-new": ("AppVM", {MARK})})
    recovery = Recovery(_config(tmp_path), cast(AdminClient, fake), log)
    lock = asyncio.Lock()
    assert [r.reason for r in asyncio.run(recovery.sweep(lock))] == ["removed ai-new"]
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert (last["principal"], last["op"], last["request_id"]) == ("dom0", "recovery.remove", RID)
    assert last["detail"]["reason"] == "removed ai-new, left by qube.create"
    # recorded once: a qube of that name made later (by anyone) is never its business again
    fake.qubes["ai-new"] = ("AppVM", set())
    assert asyncio.run(recovery.sweep(lock)) == []
    assert asyncio.run(Recovery(config(), cast(AdminClient, fake), log).reconcile()) == []
    assert "ai-new" in fake.qubes


def _recording_line(tmp_path: Path, exit_code: int) -> Path:
    """A stand-in for dom0's qrexec-client that records each call and answers ``exit_code``."""
    script = tmp_path / "qrexec-client"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nexit {exit_code}\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    ("op", "targets"),
    [
        ("qube.run", ["ai-dev"]),
        ("file.write", ["ai-dev"]),
        ("file.copy", ["ai-dev", "ai-build"]),
    ],
)
def test_a_command_the_gate_died_relaying_is_ended_in_its_qubes(
    tmp_path: Path, op: str, targets: list[str]
) -> None:
    """Killing dom0's end of the line does not stop a command in a qube (issue 11 §4): at
    start, recovery kills every process carrying the request's run marker in each qube."""
    log = _journal(tmp_path, op, targets)
    cfg = _config(tmp_path, line=_recording_line(tmp_path, 0))
    recovery = Recovery(cfg, cast(AdminClient, FakeQubesd({})), log)
    assert len(asyncio.run(recovery.reconcile())) == 1
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[1] for c in calls] == targets  # -d QUBE, once per qube
    assert all(RID in c and c.startswith("-d ") for c in calls)
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert last["detail"]["reason"] == f"ended its run in {', '.join(targets)}"


class ShutdownQubesd(FakeQubesd):
    """Records shutdowns; a halted qube refuses one, as qubesd does."""

    def __init__(self, running: set[str]) -> None:
        super().__init__({})
        self.running = running
        self.shut: list[str] = []

    async def call(self, dest: str, method: str, arg: str = "", payload: bytes = b"") -> str:
        assert (method, arg) == ("admin.vm.Shutdown", "wait")
        if dest not in self.running:
            raise QubesdError("QubesVMNotStartedError", dest)
        self.running.discard(dest)
        self.shut.append(dest)
        return ""


@pytest.mark.parametrize("running", [{"ai-debian"}, set()], ids=["running", "halted"])
def test_an_interrupted_template_update_ends_its_run_and_shuts_the_template_down(
    tmp_path: Path, running: set[str]
) -> None:
    log = _journal(tmp_path, "template.update", ["ai-debian"])
    cfg = _config(tmp_path, line=_recording_line(tmp_path, 0))
    fake = ShutdownQubesd(set(running))
    asyncio.run(Recovery(cfg, cast(AdminClient, fake), log).reconcile())
    assert fake.shut == sorted(running) and fake.running == set()
    last = json.loads(log.path.read_text().splitlines()[-1])
    shut = "; shut down ai-debian" if running else ""
    assert (last["outcome"], last["detail"]["reason"]) == (
        "interrupted",
        f"ended its run in ai-debian{shut}",
    )


def test_a_run_whose_qube_does_not_answer_is_recorded_as_nothing_to_do(tmp_path: Path) -> None:
    log = _journal(tmp_path, "qube.run", ["ai-dev"])
    cfg = _config(tmp_path, line=_recording_line(tmp_path, 1))
    asyncio.run(Recovery(cfg, cast(AdminClient, FakeQubesd({})), log).reconcile())
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert (last["outcome"], last["detail"]["reason"]) == ("interrupted", "nothing to do")
