"""The generated policy's position (decision record 0011) and what ``doctor`` says about the
operator's own rules that meet it, evaluated with the policy engine."""

from __future__ import annotations

from qubes_mcp.dom0.operator.policy_overlap import describe, overlaps
from qubes_mcp.dom0.render import FORMER_POLICY_NAMES, POLICY_NAME
from qubes_mcp.policy import AccessDenied, Policy, SystemInfo

OURS = """\
qmcp.List        *  mcp-control  @adminvm  allow target=@adminvm
*                *  mcp-control  @adminvm  deny
*                *  mcp-control  @anyvm    deny
qubes.NotifyTools * ai-dev       @adminvm  allow
*                *  ai-dev       @adminvm  deny
*                *  ai-dev       @anyvm    deny
"""
USER = """\
qubes.ClipboardPaste * mcp-control @anyvm ask
qubes.Filecopy       * ai-dev      personal allow
qubes.Gpg            * @anyvm      vault allow
qubes.Filecopy       * work        personal allow
"""
STOCK = "qubes.Filecopy * @anyvm @anyvm ask\n"
INFO = SystemInfo.from_json(
    {
        "domains": {
            "dom0": {"type": "AdminVM"},
            "mcp-control": {"type": "AppVM"},
            "ai-dev": {"type": "AppVM"},
            "work": {"type": "AppVM"},
            "personal": {"type": "AppVM"},
            "vault": {"type": "AppVM"},
        }
    }
)
QUBES = {"mcp-control": "principal", "ai-dev": "enrolled"}


def policy(**files: str) -> Policy:
    return Policy.from_texts({POLICY_NAME: OURS, "90-default.policy": STOCK, **files})


def test_the_generated_file_sorts_before_the_user_and_global_config_files() -> None:
    names = sorted(
        [POLICY_NAME, "30-user.policy", "50-config-clipboard.policy", "35-compat.policy"]
    )
    assert names[0] == POLICY_NAME
    # the operator's documented exception slot sorts before it
    assert sorted([POLICY_NAME, "20-qubes-mcp-local.policy"])[0] == "20-qubes-mcp-local.policy"
    assert "30-qubes-mcp.policy" in FORMER_POLICY_NAMES and POLICY_NAME not in FORMER_POLICY_NAMES


def test_user_rules_for_our_qubes_are_shadowed_and_still_do_not_apply() -> None:
    p = policy(**{"30-user.policy": USER})
    found = {(o.kind, o.qube, o.rule.lineno) for o in overlaps(p, POLICY_NAME, QUBES, INFO)}
    assert found == {
        ("shadowed", "mcp-control", 1),  # the clipboard from the control qube
        ("shadowed", "ai-dev", 2),  # a try to widen a sandbox: it does not apply
        ("shadowed", "mcp-control", 3),  # split-GPG for @anyvm does not reach our qubes
        ("shadowed", "ai-dev", 3),
    }  # line 4 is about `work`, which is neither: not reported; stock 90-default: not reported
    # the engine agrees: the sandbox's copy is denied at our file
    try:
        p.evaluate(
            service="qubes.Filecopy",
            argument="+",
            source="ai-dev",
            target="personal",
            system_info=INFO,
        )
        raise AssertionError("a 30-user rule widened a sandbox")
    except AccessDenied:
        pass
    messages = describe(overlaps(p, POLICY_NAME, QUBES, INFO), POLICY_NAME)
    assert all(sev == "warning" for sev, _ in messages)
    assert any(
        "30-user.policy:1" in m and "control qube mcp-control" in m and "sorts before" in m
        for _, m in messages
    )


def test_an_earlier_file_that_reaches_a_sandbox_through_anyvm_is_an_error() -> None:
    p = policy(**{"20-widen.policy": "qubes.Filecopy * @anyvm @anyvm allow\n"})
    found = overlaps(p, POLICY_NAME, QUBES, INFO)
    assert {(o.kind, o.qube) for o in found} == {
        ("overrides", "mcp-control"),
        ("overrides", "ai-dev"),
    }
    messages = describe(found, POLICY_NAME)
    assert [sev for sev, _ in messages] == ["error", "error"]
    assert "widens the boundary" in messages[0][1]


def test_an_explicit_earlier_exception_is_a_warning_and_a_deny_only_narrows() -> None:
    p = policy(
        **{
            "20-qubes-mcp-local.policy": "qubes.ClipboardPaste * mcp-control @anyvm ask\n"
            "qubes.NotifyTools * ai-dev @adminvm deny\n"
        }
    )
    found = overlaps(p, POLICY_NAME, QUBES, INFO)
    assert {(o.kind, o.qube, o.explicit, o.widens) for o in found} == {
        ("overrides", "mcp-control", True, True),
        ("overrides", "ai-dev", True, False),
    }
    assert all(sev == "warning" for sev, _ in describe(found, POLICY_NAME))
