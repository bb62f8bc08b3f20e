"""Qubes the operator makes by ordinary Qubes means from enrolled ones are in no agent's scope.

R4.3 copies every tag of a disposable template into each disposable (``DispVM.__init__``) and
``qvm-clone`` copies every tag but ``created-by-*``; an operator can also ``qvm-create`` from an
enrolled template, or remove an enrolled qube and re-create the name. Enrolment is by name and
uuid, recorded in dom0 (decision record 0010), so each of these qubes -- even carrying the
scope's tags, which the tests set explicitly exactly as R4.3 would copy them -- is:

- invisible to the principal: absent from ``qube_list``; every operation on it gets the very
  same answer as a made-up name (qrexec's refusal, since the policy does not name it);
- refused by qrexec as a source: it gets nothing from the generated policy.

Run end to end on the emulator: operator actions go straight to qubesd as dom0.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.dom0.admin import AdminClient
from qubes_mcp.dom0.config import load_config
from qubes_mcp.dom0.enrolment import Registry, registry_path
from qubes_mcp.dom0.operations import OPERATIONS, Target
from qubes_mcp.dom0.operator.install import Layout
from qubes_mcp.sim.qrexec.client import call as router_call
from qubes_mcp.stack import Stack, start_emulator, start_stack, stop_process
from tests.enrolment_helpers import enrol, unenrol
from tests.gate_e2e import dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

QUBE_OPS = [op for op in OPERATIONS if op.target is Target.QUBE]
POLICY = "etc/qubes/policy.d/25-qubes-mcp.policy"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("scope") / "root")
    try:
        yield s
    finally:
        s.stop()


def _inherit(stack: Stack, name: str, tags: list[str]) -> None:
    """Give ``name`` the tags R4.3 would have copied into it (idempotent)."""
    have = set(dom0_admin(stack, name, "admin.vm.tag.List").split())
    for tag in tags:
        if tag not in have:
            dom0_admin(stack, name, "admin.vm.tag.Set", tag)


def _visible(stack: Stack) -> set[str]:
    return {q["name"] for q in ok(gate_call(stack, "@adminvm", "qmcp.List"))["qubes"]}


def _policy(stack: Stack) -> str:
    return (stack.root / POLICY).read_text()


def _assert_invisible(stack: Stack, name: str) -> None:
    assert name not in _visible(stack)
    assert name not in _policy(stack).split()
    # every operation on it: byte for byte what a made-up name gets (through the real router)
    for op in QUBE_OPS:
        hidden = stack.call(name, op.service, b"{}")
        missing = stack.call("no-such-qube", op.service, b"{}")
        assert (hidden.returncode, hidden.stdout, hidden.stderr) == (
            missing.returncode,
            missing.stdout,
            missing.stderr,
        ), op.service
        assert hidden.returncode == 126
    # as a source it gets nothing from our policy: not the gate, not the updates proxy (the
    # rest is the stock policy's business for the operator's own qubes; the engine-level
    # test_policy_confinement proves our file adds no answer for such a source)
    for target, service in [
        ("@adminvm", "qmcp.List"),
        ("ai-dev", "qmcp.Info"),
        ("@default", "qubes.UpdatesProxy"),
        ("ai-egress", "qubes.UpdatesProxy"),
    ]:
        assert stack.call(target, service, b"", source=name).returncode == 126, service


def test_the_operators_disposable_of_an_enrolled_dvm_template(stack: Stack) -> None:
    inherited = dom0_admin(stack, "ai-dvm", "admin.vm.tag.List").split()
    assert "ai-managed" in inherited  # the template is enrolled
    disp = dom0_admin(stack, "ai-dvm", "admin.vm.CreateDisposable")  # the menu / qvm-run --dispvm
    _inherit(stack, disp, [t for t in inherited if t.startswith("ai-")])
    dom0_admin(stack, disp, "admin.vm.Start")
    _assert_invisible(stack, disp)


def test_the_operators_clone_of_an_enrolled_qube(stack: Stack) -> None:
    # qvm-clone: a new qube of the same class and template, then every tag copied
    template = dom0_admin(stack, "ai-dev", "admin.vm.property.Get", "template").split()[-1]
    dom0_admin(stack, "dom0", "admin.vm.Create.AppVM", template, b"name=ai-dev-copy label=red")
    _inherit(stack, "ai-dev-copy", dom0_admin(stack, "ai-dev", "admin.vm.tag.List").split())
    dom0_admin(stack, "ai-dev-copy", "admin.vm.Start")
    _assert_invisible(stack, "ai-dev-copy")


def test_a_qube_the_operator_creates_from_an_enrolled_template(stack: Stack) -> None:
    dom0_admin(stack, "dom0", "admin.vm.Create.AppVM", "ai-debian", b"name=mine label=blue")
    _assert_invisible(stack, "mine")
    # even if the operator copies the template's tags onto it by hand
    _inherit(stack, "mine", dom0_admin(stack, "ai-debian", "admin.vm.tag.List").split())
    _assert_invisible(stack, "mine")


def _wait_until(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_removed_and_recreated_name_does_not_inherit_the_enrolment(stack: Stack) -> None:
    enrol(stack, "work", "--tier", "exec")
    assert "work" in _visible(stack)
    tags = dom0_admin(stack, "work", "admin.vm.tag.List").split()
    template = dom0_admin(stack, "work", "admin.vm.property.Get", "template").split()[-1]
    dom0_admin(stack, "work", "admin.vm.Remove")
    dom0_admin(stack, "dom0", "admin.vm.Create.AppVM", template, b"name=work label=red")
    _inherit(stack, "work", tags)  # same name, same tags: a different qube
    assert "work" not in _visible(stack)
    # the gate reconciles on qubesd's domain-delete: the name leaves registry and policy
    config = load_config(stack.config)
    path = registry_path(config.paths.state_dir)
    _wait_until(lambda: Registry.load(path).entry("ai", "work") is None)
    _wait_until(lambda: "work" not in _policy(stack).split())
    _assert_invisible(stack, "work")
    # the operator can enrol the new qube on purpose
    enrol(stack, "work")
    assert "work" in _visible(stack)
    unenrol(stack, "work")
    assert "work" not in _visible(stack)


def test_a_disposable_the_gate_creates_is_registered_by_the_gate(stack: Stack) -> None:
    made = ok(gate_call(stack, "ai-dvm", "qmcp.CreateDisposable", {}))
    name = made["name"]
    assert name in _visible(stack)
    entry = Registry.load(registry_path(load_config(stack.config).paths.state_dir)).entry(
        "ai", name
    )
    assert entry is not None and entry.by == "gate:mcp-control" and entry.klass == "DispVM"
    assert name in _policy(stack).split()


def test_enrol_refuses_dom0_and_missing_qubes(stack: Stack) -> None:
    missing = stack.admin("enrol", "no-such-qube")
    assert missing.returncode == 1 and "no such qube: no-such-qube" in missing.stderr
    dom0 = stack.admin("enrol", "dom0")
    assert dom0.returncode == 1 and "refusing to enrol dom0" in dom0.stderr


def test_install_refuses_stray_tags_and_changes_nothing(stack: Stack) -> None:
    dom0_admin(stack, "personal", "admin.vm.tag.Set", "ai-exec")
    before = _policy(stack)
    state = load_config(stack.config).paths.state_dir
    registry_before = (Path(state) / "enrolment.json").read_bytes()
    try:
        out = stack.admin("install", "--root", str(stack.root))
        assert out.returncode == 1
        assert "personal carries ai-exec but is not enrolled in ai" in out.stderr
        assert _policy(stack) == before
        assert (Path(state) / "enrolment.json").read_bytes() == registry_before
    finally:
        dom0_admin(stack, "personal", "admin.vm.tag.Remove", "ai-exec")


def test_first_install_migrates_tagged_qubes_and_says_so_and_later_installs_do_not(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    emulator = start_emulator(root)
    try:
        argv = [sys.executable, "-m", "qubes_mcp.dom0.operator.cli", "install", "--root", str(root)]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert first.returncode == 0, first.stderr
        said = set(re.findall(r"^enrolled (\S+) \((.*?)\) in scope ai", first.stdout, re.M))
        registry = Registry.load(registry_path(load_config(Layout(root).config).paths.state_dir))
        members = {n: e.klass for n, e in registry.members("ai").items()}
        dumps = set(registry.dumps("ai"))
        # exactly the qubes that carried the tags, each one printed
        assert said == {*members.items(), *((n, "dump sink") for n in dumps)}
        assert {"ai-dev", "ai-dvm", "ai-egress"} <= set(members) and dumps
        # an operator's disposable of an enrolled template appears later: not migrated, refused
        disp = asyncio.run(
            AdminClient(root / "run/qubesd.sock").call("ai-dvm", "admin.vm.CreateDisposable")
        )
        for tag in ("ai-managed", "ai-exec"):
            asyncio.run(AdminClient(root / "run/qubesd.sock").call(disp, "admin.vm.tag.Set", tag))
        again = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 1 and f"{disp} carries ai-exec, ai-managed" in again.stderr
        assert "enrolled" not in again.stdout
    finally:
        stop_process(emulator)


_MISSING_UUID = "12345678-9abc-4def-8123-456789abcdef"


def test_every_target_form_through_the_real_router(stack: Stack) -> None:
    """A sample of the engine-level matrix (test_policy_confinement) through the emulator's
    qrexec router: for the principal and each kind of sandbox source, a hidden qube (here a
    hidden disposable template) and a missing one get the same answer in every target form."""
    dom0_admin(
        stack, "dom0", "admin.vm.Create.AppVM", "debian-13-xfce", b"name=secret-dvm label=red"
    )
    dom0_admin(stack, "secret-dvm", "admin.vm.property.Set", "template_for_dispvms", b"True")
    secret = dom0_admin(stack, "secret-dvm", "admin.vm.List").split("uuid=")[1].strip()
    born = ok(gate_call(stack, "ai-dvm", "qmcp.CreateDisposable", {}))["name"]
    ok(gate_call(stack, born, "qmcp.Start", {}))
    pairs = [
        ("secret-dvm", "no-such-qube"),
        ("@dispvm:secret-dvm", "@dispvm:no-such-dvm"),
        (f"@dispvm:uuid:{secret}", f"@dispvm:uuid:{_MISSING_UUID}"),
        ("@dispvm:@tag:ai-managed", "@dispvm:@tag:no-such-tag"),
        (f"uuid:{secret}", f"uuid:{_MISSING_UUID}"),
        ("Secret-dvm", "no-such-qube"),
        ("@default", "no-such-qube"),
        ("$dispvm:secret-dvm", "$dispvm:no-such-dvm"),
    ]
    cases = [("mcp-control", "qmcp.Info"), ("mcp-control", "qubes.GetDate")]
    for source in ("ai-dev", "ai-notes", "ai-debian", born):
        cases += [(source, "qubes.GetDate"), (source, "qubes.UpdatesProxy")]
        cases += [(source, "qubes.VMShell")]

    async def answer(source: str, target: str, service: str) -> tuple[bool, bytes]:
        for attempt in range(2):
            try:
                result = await router_call(
                    stack.paths, source=source, target=target, service_and_arg=service, timeout=120
                )
                break
            except (BrokenPipeError, ConnectionResetError):
                # seen once on the loaded 2-core machine: the emulator's transport, not a
                # policy answer (a refusal is an exit code, never a dropped connection)
                if attempt:
                    raise
        # what qrexec decided is the oracle: refused (and its exact bytes) or let through; an
        # allowed call's own output and exit status may differ (the date, a busy egress qube)
        refused = result.exit_code == 126 and result.stderr == b"Request refused\n"
        return refused, (result.stdout + result.stderr) if refused else b""

    async def run_all() -> list[str]:
        wrong = []
        for source, service in cases:
            for hidden, missing in pairs:
                a = await answer(source, hidden, service)
                b = await answer(source, missing, service)
                if a != b:
                    wrong.append(f"{source} {service}: {hidden} {a} vs {missing} {b}")
        return wrong

    assert asyncio.run(run_all()) == []


def test_a_birth_whose_policy_would_not_validate_is_refused_and_rolled_back(
    tmp_path: Path,
) -> None:
    """In-process gate on an emulated qubesd: registration is the last step of a birth, and a
    registry change is written only with a policy that validates; otherwise nothing is
    registered and the new qube is removed again."""
    from qubes_mcp.dom0.audit.log import AuditLog
    from qubes_mcp.dom0.config import parse_config
    from qubes_mcp.dom0.consent import ConsentBroker
    from qubes_mcp.dom0.gate import Gate, Request
    from tests.enrolment_helpers import migrate_tagged
    from tests.gate_fixtures import CONFIG_TEXT
    from tests.qubesd_fixtures import Qubesd, demo_app

    qubesd = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        config = parse_config(
            CONFIG_TEXT + f'\n[paths]\nqubesd_socket = "{qubesd.paths.qubesd_sock}"\n'
            f'state_dir = "{tmp_path}/state"\npolicy_dir = "{tmp_path}/policy.d"\n'
        )
        migrate_tagged(config)
        client = AdminClient(qubesd.paths.qubesd_sock)
        gate = Gate(config, AuditLog(tmp_path / "audit.log"), ConsentBroker(5), client)
        before = asyncio.run(client.lines("dom0", "admin.vm.List"))
        registry_before = (tmp_path / "state/enrolment.json").read_bytes()
        (tmp_path / "policy.d/31-broken.policy").write_text("qubes.Filecopy * @anyvm\n")
        req = Request("qmcp.CreateDisposable", "mcp-control", "ai-dvm", b"{}")
        reply = asyncio.run(gate.handle(req))
        assert reply["ok"] is False and reply["error"]["code"] == "failed", reply
        assert asyncio.run(client.lines("dom0", "admin.vm.List")) == before  # rolled back
        assert (tmp_path / "state/enrolment.json").read_bytes() == registry_before
        (tmp_path / "policy.d/31-broken.policy").unlink()
        made = asyncio.run(gate.handle(req))
        assert made["ok"] is True, made
        name = made["result"]["name"]
        assert Registry.load(tmp_path / "state/enrolment.json").entry("ai", name) is not None
    finally:
        qubesd.stop()
