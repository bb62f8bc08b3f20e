"""``template.update`` end to end on the emulator, and its attack surface (issue 10 §4).

The emulated template's package manager goes out the Qubes way -- ``qrexec-client-vm @default
qubes.UpdatesProxy``, routed by the generated policy to the scope's egress qube -- and the
emulated proxy there says nothing is newer, so the update succeeds and changes nothing. The
flow and the report's shape are real: the package lists come from the template's ``dpkg-query``
before and after, the template is shut down after, and the request is one audit line.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap


def _ask_consent(text: str) -> str:
    return text.replace("[consent]\n", '[consent]\noperations = ["template.update"]\n', 1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("update") / "root")
    try:
        yield s
    finally:
        s.stop()


def _state(stack: Stack, name: str) -> str:
    return dom0_admin(stack, name, "admin.vm.List").split("state=")[1].split()[0]


def test_an_update_reports_the_package_changes_and_leaves_the_template_halted(
    stack: Stack,
) -> None:
    result = ok(gate_call(stack, "ai-debian", "qmcp.TemplateUpdate"))
    assert (result["template"], result["manager"], result["exit_code"]) == ("ai-debian", "apt", 0)
    assert result["packages"] > 0  # the template's dpkg-query listed what is installed
    assert (result["upgraded"], result["installed"], result["removed"]) == ([], [], [])
    assert result["upgraded_count"] == result["installed_count"] == result["removed_count"] == 0
    assert "0 upgraded, 0 newly installed" in result["log_tail"]
    assert result["state"] == "Halted" and _state(stack, "ai-debian") == "Halted"
    line = audit_lines(stack)[-1]
    assert (line["op"], line["targets"], line["outcome"]) == (
        "template.update",
        ["ai-debian"],
        "ok",
    )
    assert (line["detail"]["dest"], line["detail"]["count"]) == ("ai-egress", 0)
    assert line["detail"]["exit_code"] == 0


def test_the_update_went_through_the_scopes_egress(stack: Stack) -> None:
    # the same package manager in an app qube: no UpdatesProxy line for it, so it is refused
    reply = ok(gate_call(stack, "ai-dev", "qmcp.Run", {"command": ["apt-get", "update"]}))
    assert reply["exit_code"] == 100 and "Could not connect" in reply["stdout"]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("ai-dev", "not-allowed"),  # an app qube: only templates are updated
        ("ai-notes", "insufficient-tier"),  # read tier
    ],
)
def test_what_is_not_an_updatable_template_is_refused(
    stack: Stack, target: str, expected: str
) -> None:
    before = len(audit_lines(stack))
    assert code(gate_call(stack, target, "qmcp.TemplateUpdate")) == expected
    line = audit_lines(stack)[-1]
    assert len(audit_lines(stack)) == before + 1
    assert (line["op"], line["decision"], line["code"]) == ("template.update", "refused", expected)


@pytest.mark.parametrize("hidden", ["debian-13-xfce", "no-such-template", "dom0", "ai-dump"])
def test_a_hidden_template_is_refused_by_qrexec_like_a_missing_one(
    stack: Stack, hidden: str
) -> None:
    assert gate_call(stack, hidden, "qmcp.TemplateUpdate") == {"refused": 126}


def test_bad_input_changes_nothing(stack: Stack) -> None:
    for payload in ({"timeout": 5}, {"timeout": "900"}, {"command": ["id"]}):
        assert code(gate_call(stack, "ai-debian", "qmcp.TemplateUpdate", payload)) == (
            "invalid-input"
        )


def test_an_operator_can_require_consent_and_a_denial_runs_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = start_stack(tmp_path_factory.mktemp("update-consent") / "root", config_edit=_ask_consent)
    try:
        operator = answer_when_pending(s, "deny", op="template.update")
        assert code(gate_call(s, "ai-debian", "qmcp.TemplateUpdate")) == "consent-denied"
        operator.join(timeout=30)
        line = audit_lines(s)[-1]
        assert (line["op"], line["code"], line["outcome"]) == (
            "template.update",
            "consent-denied",
            "not-run",
        )
        assert "run_id" not in line["detail"]  # nothing ran in the template
        assert _state(s, "ai-debian") == "Halted"
        operator = answer_when_pending(s, "approve", op="template.update")
        result = ok(gate_call(s, "ai-debian", "qmcp.TemplateUpdate"))
        operator.join(timeout=30)
        assert result["exit_code"] == 0
        assert audit_lines(s)[-1]["detail"]["consent"] == "approved"
    finally:
        s.stop()
