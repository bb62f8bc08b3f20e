"""``template.update`` and the ``usb`` device class: the decision's rules, and the parsing of what
the template reports."""

from __future__ import annotations

import pytest

from qubes_mcp.dom0.config import parse_config
from qubes_mcp.dom0.errors import InsufficientTierError, InvalidInputError, NotAllowedError
from qubes_mcp.dom0.handlers_update import changes, parse_output
from tests.gate_fixtures import CONFIG_TEXT, config, decide_request, qube

CFG = config()


def test_an_exec_template_in_a_scope_with_an_egress_may_be_updated() -> None:
    verdict = decide_request(
        CFG, "template.update", "ai-debian", principal=CFG.principals["mcp-control"]
    )
    assert not verdict.consent and verdict.args["timeout"] == 900


@pytest.mark.parametrize(
    ("target", "principal", "refusal"),
    [
        ("ai-dev", "mcp-control", NotAllowedError),  # an app qube
        ("ai-dvm", "mcp-control", NotAllowedError),  # a disposable template is an app qube
        ("ai-debian", "auditor", InsufficientTierError),  # read ceiling
    ],
)
def test_only_templates_at_exec(target: str, principal: str, refusal: type[Exception]) -> None:
    with pytest.raises(refusal):
        decide_request(CFG, "template.update", target, principal=CFG.principals[principal])


def test_a_scope_without_an_egress_cannot_update() -> None:
    cfg = parse_config(CONFIG_TEXT.replace('egress_qube = "ai-egress"\n', ""))
    with pytest.raises(NotAllowedError, match="no egress"):
        decide_request(cfg, "template.update", "ai-debian", principal=cfg.principals["mcp-control"])


def test_the_operator_may_ask_to_confirm_updates() -> None:
    cfg = parse_config(
        CONFIG_TEXT.replace("[consent]\n", '[consent]\noperations = ["template.update"]\n')
    )
    verdict = decide_request(
        cfg, "template.update", "ai-debian", principal=cfg.principals["mcp-control"]
    )
    assert verdict.consent


def test_the_diff_names_upgrades_installs_and_removals() -> None:
    out = b"apt\nbash 5.1\nlibc6 2.36-1\nold-pkg 1.0\n--\nbash 5.2\nlibc6 2.36-1\nnew-pkg 0.1\n"
    parsed = parse_output(out)
    assert parsed is not None and parsed[0] == "apt"
    assert changes(parsed[1], parsed[2]) == {
        "upgraded": [{"name": "bash", "from": "5.1", "to": "5.2"}],
        "installed": [{"name": "new-pkg", "version": "0.1"}],
        "removed": [{"name": "old-pkg", "version": "1.0"}],
    }


@pytest.mark.parametrize(
    "stdout",
    [
        b"",  # nothing at all
        b"apt\nbash 5.1\n",  # cut before the second list
        b"pacman\n--\n",  # a family dom0 did not ask for
        b"qubes-mcp: no known package manager\n",
    ],
    ids=["empty", "no-second-list", "unknown-family", "an-error-line"],
)
def test_output_without_both_lists_is_no_report(stdout: bytes) -> None:
    assert parse_output(stdout) is None


def test_hostile_lines_from_the_template_are_dropped() -> None:
    out = (
        b"apt\nok 1\n"
        b"\x1b[31mred 1\n"  # terminal escapes
        b"spaces in name 1\n"  # not "name version"
        + b"x" * 300
        + b" 1\n"  # over-long name
        + b"--\nok 1\n\xff\xfe 2\n"
    )
    parsed = parse_output(out)
    assert parsed is not None
    assert parsed[1] == {"ok": "1"} and parsed[2] == {"ok": "1"}


# --- the usb device class (issue 10 §4): the block rule, and no read-only ----------------------


def _usb(op: str, target: str, **args: object) -> object:
    up = [
        qube("ai-usb", "ai-managed", "ai-full", state="Running"),
        qube("ai-build", "ai-managed", "ai-full", state="Running"),
    ]
    return decide_request(
        CFG,
        op,
        target,
        principal=CFG.principals["mcp-control"],
        extra=up,
        backend="ai-usb",
        device="2-1",
        devclass="usb",
        **args,
    )


def test_usb_attach_and_detach_need_consent_like_block() -> None:
    assert _usb("device.attach", "ai-build").consent  # type: ignore[attr-defined]
    assert _usb("device.detach", "ai-build").consent  # type: ignore[attr-defined]


def test_usb_devices_do_not_attach_read_only() -> None:
    with pytest.raises(InvalidInputError, match="read_only"):
        _usb("device.attach", "ai-build", read_only=True)
