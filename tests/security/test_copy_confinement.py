"""Sandbox qubes call nothing in one another; copies are relayed by dom0 (issue 7 §1).

Before, ``file.copy`` ran ``qvm-copy-to-vm`` in the source, so the generated policy allowed
``qubes.Filecopy`` between tiers, and any code in a sandbox could push files into another
qube — guarded ones included — with no gate decision, consent or audit line. Now the gate
runs both halves itself, so no such line is needed.

- The policy property, for every ordered pair of sandbox qubes of the demo fleet and every
  ``qubes.*`` service the stock R4.3 policy allows or asks for: refused. The one designed
  exception is ``qubes.UpdatesProxy`` from an enrolled *template* to the egress qube.
- End to end: with every ``qubes.Filecopy`` line removed from the installed policy, the gate's
  copy still lands, while the sandbox's own ``qvm-copy-to-vm`` and a raw ``qubes.Filecopy``
  call are refused.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.dom0.render import POLICY_NAME, render_policy, validated_policy
from qubes_mcp.policy import AccessDenied, AllowResolution, Policy, SystemInfo
from qubes_mcp.stack import Stack, start_stack
from tests.enrolment_helpers import registry_for
from tests.gate_e2e import gate_call, ok
from tests.gate_fixtures import config, demo_qubes

STOCK = Path(__file__).resolve().parents[2] / "src" / "qubes_mcp" / "sim" / "data" / "policy.d"
EGRESS = "ai-egress"

_SERVICE = re.compile(r"\A(qubes\.[A-Za-z0-9_.-]+)\s")


def stock_services() -> list[str]:
    """Every ``qubes.*`` service some stock policy line allows or asks for."""
    found: set[str] = set()
    for path in sorted(STOCK.rglob("*")):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            match = _SERVICE.match(line)
            if match and re.search(r"\s(allow|ask)(\s|$)", line):
                found.add(match.group(1))
    return sorted(found)


SERVICES = stock_services()
#: the demo fleet's tagged qubes, enrolled by name as the first install does
REGISTRY = registry_for(demo_qubes())
#: the sandbox qubes: every qube enrolled in the scope, members and dump sinks (a qube that
#: only carries scope tags is not enrolled, so not a sandbox: decision record 0010)
SANDBOX = sorted(REGISTRY.entries("ai"))
TEMPLATES = {q.name for q in demo_qubes() if q.klass == "TemplateVM"}

_TMP = tempfile.TemporaryDirectory(prefix="qmcp-copy-policy-")


def _installed_policy() -> Policy:
    root = Path(_TMP.name) / "policy.d"
    if not root.exists():
        shutil.copytree(STOCK, root)
        (root / POLICY_NAME).write_text(validated_policy(config(), REGISTRY))
    return Policy.load([root])


def _info() -> SystemInfo:
    domains = {
        q.name: {
            "type": q.klass,
            "tags": sorted(q.tags),
            "template_for_dispvms": q.flag("template_for_dispvms"),
            "default_dispvm": "ai-dvm",
            "internal": False,
            "power_state": "Running",
        }
        for q in demo_qubes()
    }
    return SystemInfo.from_json({"domains": domains})


POLICY = _installed_policy()
INFO = _info()


def resolves(source: str, target: str, service: str) -> str:
    try:
        res = POLICY.evaluate(
            service=service, argument="+", source=source, target=target, system_info=INFO
        )
    except AccessDenied:
        return "deny"
    return f"allow:{res.target}" if isinstance(res, AllowResolution) else "ask"


def starts_in(source: str, target: str, service: str) -> str | None:
    """Where the call would start the service: the resolved qube, ``"ask"`` for a dialog
    (the operator could let it through), ``None`` when denied or redirected to dom0."""
    verdict = resolves(source, target, service)
    if verdict == "ask":
        return "ask"
    resolved = verdict.removeprefix("allow:")
    return None if verdict == "deny" or resolved in ("dom0", "@adminvm") else resolved


def designed(source: str, started: str, service: str) -> bool:
    """The one designed exception: an enrolled template's updates, through the egress qube."""
    return service == "qubes.UpdatesProxy" and source in TEMPLATES and started == EGRESS


def test_the_property_covers_what_it_claims() -> None:
    # the stock policy really allows these; the fleet really has sandbox qubes of every kind
    assert {"qubes.Filecopy", "qubes.VMShell", "qubes.OpenInVM", "qubes.UpdatesProxy"} <= set(
        SERVICES
    )
    assert {"ai-dev", "ai-build", "ai-dump", "ai-debian", "ai-dvm", EGRESS} <= set(SANDBOX)


@pytest.mark.parametrize("service", SERVICES)
def test_no_sandbox_qube_can_start_a_service_in_another(service: str) -> None:
    """Every ordered pair of sandbox qubes of the scope, for this stock-allowed service."""
    opened = [
        f"{source} -> {target}: starts in {started}"
        for source in SANDBOX
        for target in SANDBOX
        if source != target
        and (started := starts_in(source, target, service)) is not None
        and started != source
        and not designed(source, started, service)
    ]
    assert opened == []


def test_the_rendered_policy_has_no_filecopy_line() -> None:
    assert "qubes.Filecopy" not in render_policy(config(), REGISTRY)


# --- end to end: the gate's copy needs no policy line ---------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("nofilecopy") / "root")
    try:
        for directory in s.paths.policy_dirs:
            installed = directory / POLICY_NAME
            if installed.exists():
                lines = installed.read_text().splitlines(keepends=True)
                installed.write_text("".join(ln for ln in lines if "qubes.Filecopy" not in ln))
        yield s
    finally:
        s.stop()


@pytest.mark.bwrap
def test_the_gate_copies_with_no_filecopy_line_and_sandboxes_cannot(stack: Stack) -> None:
    installed = [d / POLICY_NAME for d in stack.paths.policy_dirs if (d / POLICY_NAME).exists()]
    assert installed and all("qubes.Filecopy" not in p.read_text() for p in installed)
    run = {"command": ["sh", "-c", "echo relayed > /home/user/r.txt"]}
    ok(gate_call(stack, "ai-dev", "qmcp.Run", run))
    landed = ok(
        gate_call(
            stack, "ai-dev", "qmcp.Copy", {"destination": "ai-build", "paths": ["/home/user/r.txt"]}
        )
    )
    assert landed["copied"] is True
    seen = ok(
        gate_call(
            stack,
            "ai-build",
            "qmcp.Run",
            {"command": ["cat", "/home/user/QubesIncoming/ai-dev/r.txt"]},
        )
    )
    assert seen["stdout"] == "relayed\n"
    # hostile code in the source, on its own: the tool, and the raw service call
    own = ok(
        gate_call(
            stack,
            "ai-dev",
            "qmcp.Run",
            {"command": ["qvm-copy-to-vm", "ai-build", "/home/user/r.txt"]},
        )
    )
    assert own["exit_code"] == 126 and "Request refused" in own["stderr"]
    raw = stack.call("ai-build", "qubes.Filecopy", b"", source="ai-dev")
    assert (raw.returncode, raw.stderr) == (126, b"Request refused\n")
    # nor into a qube of another tier
    raw = stack.call("ai-precious", "qubes.Filecopy", b"", source="ai-dev")
    assert raw.returncode == 126
