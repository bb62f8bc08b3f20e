"""Policy evaluation beyond qrexec's own cases: exact messages, fail-closed edges, threats."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubes_mcp.policy import (
    AccessDenied,
    AllowResolution,
    AskResolution,
    Policy,
    PolicySyntaxError,
    SystemInfo,
    SystemInfoError,
)
from qubes_mcp.policy.rules import parse_rule

RAW = json.loads(
    (
        Path(__file__).parents[1] / "conformance" / "data" / "policy_qrexec_system_info.json"
    ).read_text()
)
INFO = SystemInfo.from_json(RAW)


def decide(text: str, source: str, target: str, service: str = "qubes.Svc", argument: str = "+"):
    return Policy.from_texts({"30-t.policy": text}).evaluate(
        service=service, argument=argument, source=source, target=target, system_info=INFO
    )


# Exact messages of qrexec R4.3 for the same lines (file f.policy, line 7).
SYNTAX_MESSAGES = [
    ("a +b c", "wrong number of fields"),
    ("qubes.X +arg @anyvm @anyvm", "wrong number of fields"),
    ("qubes$X * @anyvm @anyvm allow", "service 'qubes$X' contains invalid characters: ('$',)"),
    ("qubes+X * @anyvm @anyvm allow", "service 'qubes+X' contains invalid characters: ('+',)"),
    ("qubes.X +a$b @anyvm @anyvm allow", "argument '+a$b' contains invalid characters: ('$',)"),
    ("qubes.X arg @anyvm @anyvm allow", "argument 'arg' does not start with +"),
    ("* +arg @anyvm @anyvm allow", "only * argument allowed for * service"),
    ("* * @default @anyvm allow", "invalid source token: '@default'"),
    ("* * @dispvm @anyvm allow", "invalid source token: '@dispvm'"),
    ("* * @invalid @anyvm allow", "invalid source token: '@invalid'"),
    ("* * @tag: @anyvm allow", "invalid empty @tag: token: '@tag:'"),
    ("* * @dispvm:@tag: @anyvm allow", "invalid empty @dispvm:@tag: token: '@dispvm:@tag:'"),
    ("* * @anyvm @tag:@x allow", "invalid target token: '@tag:@x'"),
    ("* * @anyvm @anyvm permit", "invalid action: permit"),
    ("* * @anyvm @anyvm allow notify", "invalid action parameter syntax: 'notify'"),
    ("* * @anyvm @anyvm allow notify=yes notify=no", "parameter given twice: 'notify'"),
    ("* * @anyvm @anyvm allow notify=maybe", "'notify' is 'maybe', but can be only 'yes' or 'no'"),
    ("* * @anyvm @anyvm allow autostart=1", "'autostart' is '1', but can be only 'yes' or 'no'"),
    ("* * @anyvm @anyvm deny target=dom0", "invalid parameters for action Deny: ['target=dom0']"),
    ("* * @anyvm @anyvm deny autostart=no", "invalid parameters for action Deny: ['autostart=no']"),
    ("* * @anyvm @anyvm allow default_target=dom0",
     "invalid parameters for action Allow: ['default_target=dom0']"),
    ("* * @anyvm @anyvm allow target=@anyvm", "invalid redirect token: '@anyvm'"),
    ("* * @anyvm @anyvm allow target=", "invalid empty redirect token"),
    ("* * @anyvm @anyvm ask default_target=@tag:x", "invalid redirect token: '@tag:x'"),
    ("* * @anyvm @anyvm allow target=@dispvm:@tag:x",
     "invalid redirect token: '@dispvm:@tag:x'"),
    ("* * @anyvm @default allow", "allow action for @default rule must specify target= option"),
    ("* * @anyvm @default allow user=root",
     "allow action for @default rule must specify target= option"),
    ("* * @anyvm @anyvm allow =x", "invalid parameters for action Allow: ['=x']"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "message"), SYNTAX_MESSAGES, ids=[m[0] for m in SYNTAX_MESSAGES])
def test_syntax_error_message_is_qrexecs(line: str, message: str) -> None:
    with pytest.raises(PolicySyntaxError) as err:
        parse_rule(line, filepath="f.policy", lineno=7)
    assert str(err.value) == f"f.policy:7: {message}"


# --- threat list: requests that must never be allowed -----------------------------------------

REFUSED = [
    ("empty-policy", "", "test-vm1", "test-vm2"),
    ("anyvm-does-not-cover-dom0", "* * @anyvm @anyvm allow", "test-vm1", "dom0"),
    ("anyvm-does-not-cover-adminvm-keyword", "* * @anyvm @anyvm allow", "test-vm1", "@adminvm"),
    ("anyvm-does-not-cover-dom0-uuid", "* * @anyvm @anyvm allow", "test-vm1",
     "uuid:00000000-0000-0000-0000-000000000000"),
    ("tag-of-dom0-not-reachable-by-keyword", "* * @anyvm @tag:dom0-tag allow", "test-vm1",
     "@adminvm"),
    ("unknown-target-becomes-default-not-a-name", "* * @anyvm nonexistent allow", "test-vm1",
     "nonexistent"),
    ("request-cannot-name-a-tag", "* * @anyvm @anyvm allow target=test-vm2", "test-vm1",
     "@tag:tag1"),
    ("request-cannot-name-anyvm", "* * @anyvm * allow target=test-vm2", "test-vm1", "@anyvm"),
    ("dispvm-from-non-template", "* * @anyvm @dispvm:test-vm1 allow", "test-vm1",
     "@dispvm:test-vm1"),
    ("autostart-no-halted-target", "* * @anyvm @anyvm allow autostart=no", "test-vm1", "test-vm3"),
    ("autostart-no-dispvm", "* * @anyvm @dispvm allow autostart=no", "test-vm1", "@dispvm"),
    ("allow-to-default-without-target", "* * @anyvm @anyvm allow", "test-vm1", ""),
    ("redirect-to-missing-qube", "* * @anyvm @anyvm allow target=ghost", "test-vm1", "test-vm2"),
    ("redirect-to-non-template-dispvm", "* * @anyvm @anyvm allow target=@dispvm:test-vm1",
     "test-vm1", "test-vm2"),
    ("deny-before-allow", "* * @anyvm test-vm2 deny\n* * @anyvm @anyvm allow", "test-vm1",
     "test-vm2"),
    ("other-argument", "qubes.Svc +a @anyvm @anyvm allow", "test-vm1", "test-vm2"),
    ("unknown-source", "* * @anyvm @anyvm allow", "ghost", "test-vm2"),
    # qrexec crashes on this match (no default_dispvm) and so refuses the call; a later
    # allow rule must not be reached.
    ("dispvm-match-crash-is-refusal",
     "* * test-no-dvm @dispvm:default-dvm deny\n* * test-no-dvm @dispvm allow target=test-vm1",
     "test-no-dvm", "@dispvm"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "source", "target"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_request_is_refused(text: str, source: str, target: str) -> None:
    with pytest.raises(AccessDenied):
        decide(text, source, target)


def test_argument_must_carry_its_plus() -> None:
    with pytest.raises(AccessDenied, match="must start with"):
        decide("* * @anyvm @anyvm allow", "test-vm1", "test-vm2", argument="arg")


def test_redirect_is_not_rechecked_against_policy() -> None:
    # The second rule would deny test-vm1 -> test-vm4, but a redirect is final.
    res = decide(
        "* * @anyvm test-vm2 allow target=test-vm4\n* * @anyvm test-vm4 deny",
        "test-vm1",
        "test-vm2",
    )
    assert isinstance(res, AllowResolution)
    assert (res.target, res.requested_target) == ("test-vm4", "test-vm2")


def test_admin_api_pattern_redirects_to_dom0_and_keeps_requested_target() -> None:
    res = decide("admin.vm.List * test-vm1 @tag:tag2 allow target=dom0", "test-vm1", "test-vm2",
                 service="admin.vm.List")  # fmt: skip
    assert isinstance(res, AllowResolution)
    assert res.daemon_lines(INFO) == [
        "user=DEFAULT", "result=allow", "target=dom0", "autostart=True",
        "requested_target=test-vm2",
    ]  # fmt: skip


def test_loopback_evaluates_as_allow_but_cannot_be_executed() -> None:
    # qubesd's List/Events filters stop at evaluation; only running the call refuses it.
    res = decide("* * @anyvm @anyvm allow", "test-vm1", "test-vm1")
    assert isinstance(res, AllowResolution)
    with pytest.raises(AccessDenied, match="loopback"):
        res.daemon_lines(INFO)


def test_ask_offers_neither_the_source_nor_internal_qubes() -> None:
    res = decide("* * @anyvm * ask", "test-vm1", "test-vm2")
    assert isinstance(res, AskResolution)
    offered = set(res.targets_for_ask)
    assert "test-vm1" not in offered
    assert offered.isdisjoint({"internal-vm", "default-mgmt-dvm", "@dispvm:default-mgmt-dvm"})
    assert {"dom0", "@dispvm:default-dvm", "test-vm2"} <= offered


def test_ask_with_autostart_no_offers_only_running_targets() -> None:
    res = decide("* * @anyvm @anyvm ask autostart=no", "test-vm1", "test-vm2")
    assert isinstance(res, AskResolution)
    for target in res.targets_for_ask:
        assert INFO[target].power_state == "Running"


def test_ask_choice_becomes_allow_only_for_offered_targets() -> None:
    res = decide("* * test-vm1 @anyvm ask user=alice", "test-vm1", "test-vm2")
    assert isinstance(res, AskResolution)
    allowed = res.allow("test-vm4")
    assert (allowed.target, allowed.user, allowed.requested_target) == (
        "test-vm4",
        "alice",
        "test-vm2",
    )
    with pytest.raises(AccessDenied):
        res.allow("dom0")


def test_deny_notify_follows_the_rule() -> None:
    with pytest.raises(AccessDenied) as err:
        decide("* * @anyvm @anyvm deny notify=no", "test-vm1", "test-vm2")
    assert err.value.notify is False
    with pytest.raises(AccessDenied) as err:
        decide("* * @anyvm @anyvm allow autostart=no notify=yes", "test-vm1", "test-vm3")
    assert err.value.notify is True


def test_service_specific_rules_do_not_leak_between_services() -> None:
    policy = Policy.from_texts(
        {"30-t.policy": "qubes.A * @anyvm @anyvm allow\n* * @anyvm @anyvm deny\n"}
    )

    def ask(service: str) -> object:
        return policy.evaluate(
            service=service, argument="+", source="test-vm1", target="test-vm2", system_info=INFO
        )

    for _ in range(2):  # the second round is served from the per-service cache
        assert isinstance(ask("qubes.A"), AllowResolution)
        with pytest.raises(AccessDenied):
            ask("qubes.B")


def test_500_rule_policy_decides_with_first_match_semantics() -> None:
    lines = [f"svc.{i} * @anyvm @anyvm deny" for i in range(499)] + ["* * @tag:tag2 @anyvm allow"]
    policy = Policy.from_texts({"30-big.policy": "\n".join(lines)})
    res = policy.evaluate(
        service="svc.x", argument="+", source="test-vm1", target="test-vm2", system_info=INFO
    )
    assert isinstance(res, AllowResolution)
    assert res.rule is policy.rules[499]


# --- system info -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {},
        {"domains": []},
        {"domains": {"vm": {"type": 3}}},
        {"domains": {"vm": {"type": "AppVM", "tags": "tag"}}},
        {"domains": {"vm": {"type": "AppVM", "template_for_dispvms": "yes"}}},
        {"domains": {"uuid:x": {"type": "AppVM"}}},
        {"domains": {"vm": {"type": "AppVM", "default_dispvm": 1}}},
    ],
    ids=["list", "no-domains", "domains-list", "type-int", "tags-str", "flag-str", "uuid-name",
         "dispvm-int"],
)  # fmt: skip
def test_malformed_system_info_is_refused(bad: object) -> None:
    with pytest.raises(SystemInfoError):
        SystemInfo.from_json(bad)  # type: ignore[arg-type]


def test_system_info_answers_by_name_and_by_uuid() -> None:
    assert INFO["uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4"] is INFO["test-vm2"]
    assert "uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4" not in list(INFO)
    assert len(INFO) == len(RAW["domains"])


# --- fuzz: evaluation never fails with anything but a refusal ------------------------------------

_TARGETS = st.one_of(
    st.sampled_from([*RAW["domains"], "", "@default", "@dispvm", "@adminvm", "@dispvm:default-dvm",
                     "@anyvm", "@tag:tag1", "*", "ghost", "@dispvm:", "@dispvm:@tag:tag3"]),
    st.text(max_size=20),
)  # fmt: skip
_POLICY = Policy.from_texts(
    {
        "30-t.policy": "\n".join(
            [
                "* * test-no-dvm @dispvm:@tag:tag3 ask",
                "* * @anyvm @dispvm:default-dvm ask default_target=@dispvm",
                "* * @tag:tag1 @anyvm ask autostart=no",
                "* * @type:AppVM @default allow target=@dispvm",
                "* * @anyvm * ask target=@adminvm default_target=dom0",
            ]
        )
    }
)


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from([*RAW["domains"], "ghost"]), target=_TARGETS)
def test_evaluation_only_ever_refuses_by_access_denied(source: str, target: str) -> None:
    try:
        res = _POLICY.evaluate(
            service="qubes.Svc", argument="+", source=source, target=target, system_info=INFO
        )
    except AccessDenied:
        return
    if isinstance(res, AllowResolution):
        with contextlib.suppress(AccessDenied):
            assert res.daemon_lines(INFO)[1] == "result=allow"
    else:
        assert res.targets_for_ask
        assert res.default_target is None or res.default_target in res.targets_for_ask


@pytest.mark.parametrize(
    ("text", "target", "expected"),
    [
        ("admin.vm.List * test-vm1 @tag:tag2 allow target=dom0", "test-vm2", True),
        ("admin.vm.List * test-vm1 @anyvm allow", "test-vm1", True),
        ("admin.vm.List * test-vm1 @anyvm ask", "test-vm2", False),
        ("admin.vm.List * test-vm1 @anyvm deny", "test-vm2", False),
        ("admin.vm.List * test-vm1 @tag:tag2 allow target=dom0", "test-vm3", False),
        ("admin.vm.List * test-vm1 @anyvm allow target=dom0", "@anyvm", False),
    ],
    ids=["allowed", "loopback-counts-as-allowed", "ask-is-no", "deny", "no-match",
         "illegal-target"],
)  # fmt: skip
def test_noninteractive_filter_is_qubesds(text: str, target: str, expected: bool) -> None:
    policy = Policy.from_texts({"30-t.policy": text})
    allowed = policy.allows_noninteractive(
        service="admin.vm.List", argument="+", source="test-vm1", target=target, system_info=INFO
    )
    assert allowed is expected


@pytest.mark.parametrize(
    ("internal", "expected"),
    [(None, False), ("", False), ("1", True), (True, True)],
    ids=["feature-unset-null", "feature-empty", "feature-set", "boolean"],
)
def test_system_info_takes_internal_as_qubesd_sends_it(internal: object, expected: bool) -> None:
    # R4.3 qubesd puts the *feature* value in GetSystemInfo: null, or a string
    info = SystemInfo.from_json({"domains": {"dom0": {"type": "AdminVM", "internal": internal}}})
    domain = info.get("dom0")
    assert domain is not None and domain.internal is expected
