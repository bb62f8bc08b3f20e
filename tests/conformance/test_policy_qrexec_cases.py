"""qrexec's own policy test cases (QX ``qrexec/tests/policy_parser.py``, R4.3) against our engine.

Each case is re-expressed as data: (policy text, request) -> expected outcome, with the same
fixture fleet (``data/policy_qrexec_system_info.json``). The class/test names of the original
are in the ids so that a failure points at the qrexec case it contradicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qubes_mcp.policy import (
    AccessDenied,
    AllowAction,
    AllowResolution,
    AskAction,
    AskResolution,
    DenyAction,
    Policy,
    PolicySyntaxError,
    SystemInfo,
    normalize_target,
)
from qubes_mcp.policy.rules import parse_rule, parse_service_rule
from qubes_mcp.policy.tokens import Context, expand, matches, parse_token

DATA = Path(__file__).parent / "data" / "policy_qrexec_system_info.json"
RAW_INFO = json.loads(DATA.read_text())
INFO = SystemInfo.from_json(RAW_INFO)
SVC, ARG = "test.Service", "+argument"


def policy(text: str) -> Policy:
    return Policy.from_texts({"main.policy": text})


def evaluate(pol: Policy, source: str, target: str, info: SystemInfo = INFO):
    return pol.evaluate(service=SVC, argument=ARG, source=source, target=target, system_info=info)


# --- TC_00_VMToken: where each token is legal ------------------------------------------------

_U = "uuid:d8a249f1-b02b-4944-a9e5-437def2fbe2c"
_D0 = "uuid:00000000-0000-0000-0000-000000000000"
# token: contexts where it is legal (S source, T target, R redirect, I intended target)
TOKEN_LEGALITY = {
    "test-vm1": "STRI",
    "@adminvm": "STRI",
    "dom0": "STRI",
    _D0: "STRI",
    _U: "STRI",
    "@anyvm": "ST",
    "*": "ST",
    "@default": "TI",
    "@type:AppVM": "ST",
    "@tag:tag1": "ST",
    "@dispvm": "TRI",
    "@dispvm:default-dvm": "STRI",
    "@dispvm:@tag:tag3": "ST",
    "": "",
    "@uuid:": "",
    "@uuid:d8a249f1-b02b-4944-a9e5-437def2fbe2c": "",
    "@invalid": "",
    "@dispvm:": "",
    "@dispvm:@tag:": "",
    "@tag:": "",
    "@type:": "",
}
_CTX = {"S": Context.SOURCE, "T": Context.TARGET, "R": Context.REDIRECT, "I": Context.INTENDED}


@pytest.mark.parametrize(
    ("token", "letter"),
    [(tok, letter) for tok in TOKEN_LEGALITY for letter in "STRI"],
    ids=[f"TC_00-{letter}-{tok or 'empty'}" for tok in TOKEN_LEGALITY for letter in "STRI"],
)
def test_token_is_legal_exactly_where_qrexec_allows_it(token: str, letter: str) -> None:
    if letter in TOKEN_LEGALITY[token]:
        assert parse_token(token, _CTX[letter]).text == token
    else:
        with pytest.raises(PolicySyntaxError):
            parse_token(token, _CTX[letter])


_ALL_BUT_DOM0 = [
    "@dispvm", "@dispvm:default-dvm", "@dispvm:default-mgmt-dvm", "@dispvm:test-vm3",
    "@dispvm:test-vm4", "default-dvm", "default-mgmt-dvm", "internal-vm", "test-invalid-dvm",
    "test-no-dvm", "test-relayvm1", "test-remotevm1", "test-standalone", "test-template",
    "test-vm1", "test-vm2", "test-vm3", "test-vm4", "test2-relayvm1", "test2-relayvm2",
    "test2-remotevm1", "test2-remotevm2", "test2-vm1",
]  # fmt: skip
EXPANSIONS = {
    "test-vm1": ["test-vm1"],
    "@adminvm": ["@adminvm"],
    "dom0": ["dom0"],
    _D0: ["dom0"],
    "uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4": ["test-vm2"],
    "@anyvm": _ALL_BUT_DOM0,
    "*": sorted([*_ALL_BUT_DOM0, "dom0"]),
    "@default": [],
    "@type:AppVM": [
        "default-dvm",
        "default-mgmt-dvm",
        "internal-vm",
        "test-invalid-dvm",
        "test-no-dvm",
        "test-relayvm1",
        "test-vm1",
        "test-vm2",
        "test-vm3",
        "test-vm4",
        "test2-relayvm1",
        "test2-relayvm2",
        "test2-vm1",
    ],
    "@type:TemplateVM": ["test-template"],
    "@tag:tag1": [
        "test-invalid-dvm",
        "test-no-dvm",
        "test-standalone",
        "test-template",
        "test-vm1",
    ],
    "@tag:tag2": [
        "test-invalid-dvm",
        "test-no-dvm",
        "test-standalone",
        "test-template",
        "test-vm1",
        "test-vm2",
    ],
    "@tag:no-such-tag": [],
    "@dispvm": ["@dispvm"],
    "@dispvm:default-dvm": ["@dispvm:default-dvm"],
    "@dispvm:test-vm1": [],
    "@dispvm:test-vm3": ["@dispvm:test-vm3"],
    "@dispvm:@tag:tag1": [],
    "@dispvm:@tag:tag3": ["@dispvm:test-vm3"],
    "@dispvm:uuid:fa6d56e8-a89d-4106-aa62-22e172a43c8b": ["@dispvm:test-vm3"],
}


@pytest.mark.parametrize(("token", "expected"), EXPANSIONS.items(), ids=EXPANSIONS)
def test_tc00_021_target_expands_to_the_same_choices(token: str, expected: list[str]) -> None:
    assert sorted(set(expand(parse_token(token, Context.TARGET), INFO))) == sorted(expected)


MATCH_SINGLE = [
    (_D0, "@adminvm", True), (_D0, "dom0", True), (_D0, "@dispvm:default-dvm", False),
    (_D0, "test-vm1", False), ("@anyvm", "test-vm1", True), ("@anyvm", "@default", True),
    ("@default", "@default", True), ("@tag:tag1", "test-vm1", True),
    ("@type:AppVM", "test-vm1", True), ("@type:TemplateVM", "test-template", True),
    ("@anyvm", "@dispvm", True), ("@anyvm", "@dispvm:default-dvm", True),
    ("@dispvm", "@dispvm", True), ("@dispvm:@tag:tag3", "@dispvm:test-vm3", True),
    ("@adminvm", "@adminvm", True), ("@adminvm", "dom0", True), ("dom0", "@adminvm", True),
    ("@adminvm", _D0, True), ("dom0", "dom0", True), ("test-vm3", "dom0", False),
    ("dom0", "test-vm3", False), ("test-vm3", "@adminvm", False),
    ("@adminvm", "test-vm3", False), ("test-vm3", _D0, False), (_D0, "test-vm3", False),
    ("@dispvm:default-dvm", "@dispvm:default-dvm", True), ("*", "test-vm1", True),
    ("*", "@dispvm", True), ("*", "@adminvm", True), ("@default", "no-such-vm", True),
    ("@default", "test-vm1\n", True), ("@default", "test-vm1  ", True),
    ("@default", "test-vm1", False), ("@tag:tag1", "test-vm3", False),
    ("@dispvm:@tag:tag1", "@dispvm:test-vm3", False),
    ("@dispvm:@tag:tag3", "@dispvm:default-dvm", False), ("@anyvm", "dom0", False),
    ("@anyvm", "@adminvm", False), ("@tag:dom0-tag", "@adminvm", False),
    ("@type:AdminVM", "@adminvm", False), ("@tag:dom0-tag", "dom0", True),
    ("@type:AdminVM", "dom0", True), ("@tag:tag1", "dom0", False),
    ("@dispvm", "test-vm1", False), ("@dispvm", "default-dvm", False),
    ("@dispvm:default-dvm", "default-dvm", False),
    ("uuid:6d7a02b5-532b-467f-b9fb-6596bae03c33", "test-standalone", True),
    ("uuid:f3e538bd-4427-4697-bed7-45ef3270df21", "default-dvm", True),
    ("@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21",
     "@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21", True),
    ("@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21", "@dispvm:default-dvm", True),
    ("@dispvm:default-dvm", "@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21", True),
    ("test-standalone", "uuid:6d7a02b5-532b-467f-b9fb-6596bae03c33", True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("token", "target", "expected"),
    MATCH_SINGLE,
    ids=[f"TC_00_100-{t}-vs-{r!r}-{e}" for t, r, e in MATCH_SINGLE],
)
def test_tc00_100_rule_token_matches_request_target(
    token: str, target: str, expected: bool
) -> None:
    text, kind = normalize_target(target, INFO)
    assert matches(parse_token(token, Context.TARGET), text, kind, "test-vm1", INFO) is expected


@pytest.mark.parametrize(
    "target",
    ["@dispvm:test-vm1", "@dispvm:test-invalid-dvm", "@tag:tag1", "@type:AppVM", "@invalid",
     "@anyvm", "@dispvm:@tag:tag1", "*", "@dispvm:no-such-vm"],
)  # fmt: skip
def test_tc00_101_tc01_002_illegal_request_target_is_refused_before_any_rule(target: str) -> None:
    with pytest.raises(AccessDenied):
        normalize_target(target, INFO)
    with pytest.raises(AccessDenied):
        evaluate(policy("* * @anyvm * allow target=test-vm2"), "test-vm1", target)


@pytest.mark.parametrize("target", ["no-such-vm", "", "test-vm1\n"])
def test_tc01_003_unknown_or_empty_target_becomes_default(target: str) -> None:
    assert normalize_target(target, INFO)[0] == "@default"


# --- TC_10_Rule / TC_11_Rule_service ---------------------------------------------------------

INVALID_RULE_TAILS = [
    ("@dispvm", "@default", "allow"),
    ("@default", "@default", "allow"),
    ("@anyvm", "@default", "allow,target=@dispvm:@tag:tag1"),
    ("@anyvm", "@default", "allow,target=@tag:tag1"),
    ("@anyvm", "@default", "deny,target=test-vm1"),
    ("@anyvm", "@anyvm", "deny,default_target=test-vm1"),
    ("@anyvm", "@anyvm", "deny,user=user"),
    ("@anyvm", "@anyvm", "invalid"),
    ("@anyvm", "@anyvm", "allow,invalid=xx"),
    ("@anyvm", "@anyvm", ""),
    ("@anyvm", "@anyvm", "allow,default_target=test-vm1"),
    ("@invalid", "@anyvm", "allow"),
    ("@anyvm", "@invalid", "deny"),
    ("", "", ""),
    ("@anyvm", "@anyvm", "allow extra"),
    ("@anyvm", "@default", "allow"),
    ("@anyvm", "@anyvm", "allow notify"),
    ("@anyvm", "@anyvm", "allow notify=xx"),
]


def _new_syntax(src: str, dst: str, action: str) -> str:
    if not (src or dst or action):
        return ""
    return f"test.Service +argument {src} {dst} {action}".strip()


@pytest.mark.parametrize(
    "line",
    [_new_syntax(*tail) for tail in INVALID_RULE_TAILS] + ["* +argument @anyvm @default allow"],
)
def test_tc10_030_invalid_line_is_a_syntax_error_naming_file_and_line(line: str) -> None:
    with pytest.raises(PolicySyntaxError) as err:
        parse_rule(line, filepath="filename", lineno=12)
    assert str(err.value).startswith("filename:12: ")


# TC_11 lists the first sixteen of TC_10's lines, in the old 3-column form.
@pytest.mark.parametrize(
    "tail", INVALID_RULE_TAILS[:16], ids=[" ".join(t) for t in INVALID_RULE_TAILS[:16]]
)
def test_tc11_030_invalid_old_syntax_line_is_a_syntax_error(tail: tuple[str, str, str]) -> None:
    with pytest.raises(PolicySyntaxError):
        parse_service_rule(SVC, ARG, " ".join(tail).strip(), filepath="filename", lineno=12)


PARSED_LINES = [
    ("@anyvm @anyvm ask", AskAction, "@anyvm", "@anyvm", None, None, None),
    ("@tag:tag1 @type:AppVM ask target=test-vm2 user=user", AskAction, "@tag:tag1",
     "@type:AppVM", "test-vm2", "user", None),
    ("@anyvm @default allow target=@dispvm:test-vm2", AllowAction, "@anyvm", "@default",
     "@dispvm:test-vm2", None, None),
    ("@anyvm @default ask default_target=test-vm1", AskAction, "@anyvm", "@default", None,
     None, "test-vm1"),
    ("@anyvm @adminvm ask default_target=@adminvm", AskAction, "@anyvm", "@adminvm", None,
     None, "@adminvm"),
]  # fmt: skip


@pytest.mark.parametrize("old_syntax", [False, True], ids=["TC_10", "TC_11"])
@pytest.mark.parametrize("case", PARSED_LINES, ids=[c[0] for c in PARSED_LINES])
def test_tc10_tc11_02x_line_parses_to_the_same_rule(case: tuple, old_syntax: bool) -> None:  # type: ignore[type-arg]
    text, action_type, source, target, redirect, user, default = case
    if old_syntax:
        rule = parse_service_rule(SVC, ARG, text, filepath="filename", lineno=12)
    else:
        rule = parse_rule(f"{SVC} {ARG} {text}", filepath="filename", lineno=12)
    assert (str(rule.filepath), rule.lineno) == ("filename", 12)
    assert (rule.service, rule.argument) == (SVC, ARG)
    assert isinstance(rule.action, action_type)
    assert (rule.source.text, rule.target.text) == (source, target)
    assert (rule.action.target.text if rule.action.target else None) == redirect
    assert rule.action.user == user
    if isinstance(rule.action, AskAction):
        dflt = rule.action.default_target
        assert (dflt.text if dflt else None) == default


def test_tc11_025_old_syntax_takes_comma_separated_params() -> None:
    rule = parse_service_rule(
        SVC, ARG, "@anyvm @default ask,default_target=test-vm1", filepath="f", lineno=1
    )
    assert isinstance(rule.action, AskAction)
    assert rule.action.default_target is not None
    assert rule.action.default_target.text == "test-vm1"


@pytest.mark.parametrize(
    "line",
    [
        "test.Service\t+argument\t@anyvm\t@anyvm\tallow",
        "test.Service\t+argument\t@anyvm\t@anyvm\task",
        "test.Service\t+argument\t@anyvm\t@anyvm\tdeny",
        "test.Service\t*\t@anyvm\t@anyvm\tdeny",
        "test.Service\t+argument\t@anyvm\t@dispvm:default-dvm\tallow",
        "test.Service\t+argument\t@tag:tag1\t@type:AppVM\task target=test-vm2 user=user",
        "test.Service\t+argument\t@anyvm\t@anyvm\tallow target=@adminvm",
    ],
)
def test_tc10_060_rule_serialises_back_to_its_line(line: str) -> None:
    assert str(parse_rule(line, filepath="filename", lineno=12)) == line


@pytest.mark.parametrize(("action", "default"), [("deny", True), ("ask", False), ("allow", False)])
def test_tc10_line_notify_defaults_and_values(action: str, default: bool) -> None:
    def notify(suffix: str) -> bool:
        line = f"test.Service +argument @anyvm @adminvm {action}{suffix}"
        return parse_rule(line, filepath="f", lineno=1).action.notify

    assert (notify(""), notify(" notify=yes"), notify(" notify=no")) == (default, True, False)


@pytest.mark.parametrize("action", ["ask", "allow"])
def test_tc10_line_autostart_defaults_and_values(action: str) -> None:
    def autostart(suffix: str) -> bool:
        rule = parse_rule(
            f"test.Service +argument @anyvm @anyvm {action}{suffix}", filepath="f", lineno=1
        )
        assert isinstance(rule.action, AllowAction | AskAction)
        return rule.action.autostart

    assert (autostart(""), autostart(" autostart=yes"), autostart(" autostart=no")) == (
        True,
        True,
        False,
    )


MATCH_050 = [
    ("@anyvm @anyvm", "test-vm1", "test-vm2", True),
    ("@anyvm @anyvm", "no-such-vm", "test-vm2", True),
    ("@anyvm @dispvm", "test-vm1", "@dispvm", True),
    ("@anyvm @dispvm", "test-vm1", "@dispvm:default-dvm", False),
    ("@anyvm @dispvm:default-dvm", "test-vm1", "@dispvm", True),
    ("@anyvm @dispvm:default-dvm", "test-vm1", "@dispvm:default-dvm", True),
    ("@anyvm @dispvm:@tag:tag3", "test-vm1", "@dispvm:test-vm3", True),
]


@pytest.mark.parametrize(("cols", "source", "target", "expected"), MATCH_050)
def test_tc10_050_rule_matches_request(cols: str, source: str, target: str, expected: bool) -> None:
    pol = policy(f"test.Service +argument {cols} allow")
    if expected:
        assert (
            pol.find_rule(service=SVC, argument=ARG, source=source, target=target, system_info=INFO)
            is pol.rules[0]
        )
    else:
        with pytest.raises(AccessDenied, match="no matching rule"):
            pol.find_rule(service=SVC, argument=ARG, source=source, target=target, system_info=INFO)


# --- TC_20_Policy ----------------------------------------------------------------------------


def test_tc20_000_load_skips_comments_and_blank_lines() -> None:
    pol = policy(
        "* * test-vm1 test-vm2 allow\n\n# comment\n* * test-vm2 test-vm3 ask\n"
        "    # comment with trailing whitespace:    \n* * @anyvm @anyvm ask\n"
    )
    assert len(pol.rules) == 3
    assert (pol.rules[0].source.text, pol.rules[0].target.text) == ("test-vm1", "test-vm2")
    assert isinstance(pol.rules[0].action, AllowAction)


def test_tc20_002_include_splices_rules_in_place_with_their_own_file_and_line() -> None:
    pol = Policy.from_texts(
        {
            "main.policy": "  * * test-vm1 test-vm2 allow\n  !include file2\n"
            "  * * @anyvm @anyvm deny\n",
            "file2": "  * * test-vm3 @default allow target=test-vm2\n",
        }
    )
    got = [(r.source.text, r.target.text, type(r.action), r.filepath, r.lineno) for r in pol.rules]
    assert got == [
        ("test-vm1", "test-vm2", AllowAction, "main.policy", 1),
        ("test-vm3", "@default", AllowAction, "file2", 1),
        ("@anyvm", "@anyvm", DenyAction, "main.policy", 3),
    ]


def test_tc20_003_include_service_reads_old_syntax_with_dollar_and_commas() -> None:
    pol = Policy.from_texts(
        {
            "main.policy": "!include-service * * new-syntax\n!include-service * * old-syntax\n",
            "new-syntax": "test-vm2 test-vm3 ask\n# comment with whitespace  \n"
            "@anyvm @dispvm ask default_target=@dispvm\n",
            "old-syntax": "test-vm2 test-vm3 ask\n# comment with whitespace  \n"
            "$anyvm $dispvm ask,default_target=$dispvm\n",
        }
    )
    assert len(pol.rules) == 4
    for rule in (pol.rules[1], pol.rules[3]):
        assert (rule.source.text, rule.target.text) == ("@anyvm", "@dispvm")
        assert isinstance(rule.action, AskAction)
        assert rule.action.default_target is not None
        assert rule.action.default_target.text == "@dispvm"


FIND_RULE_POLICY = """\
* * test-vm1 test-vm2 allow
* * test-vm1 @anyvm ask
* * test-vm2 @tag:tag1 deny
* * test-vm2 @tag:tag2 allow
* * test-vm2 @dispvm:@tag:tag3 allow
* * test-vm2 @dispvm:@tag:tag2 allow
* * test-vm2 @dispvm:default-dvm allow
* * @type:AppVM @default allow target=test-vm3
* * @tag:tag1 @type:AppVM allow
"""
FIND_RULE = [
    ("test-vm1", "test-vm2", 0), ("test-vm1", "test-vm3", 1), ("test-vm2", "test-vm2", 3),
    ("test-vm2", "test-no-dvm", 2), ("test-vm1", "@default", 1), ("test-vm2", "@default", 7),
    ("test-no-dvm", "test-vm3", 8), ("test-vm2", "@dispvm:test-vm3", 4),
    ("test-vm2", "@dispvm", 6), ("test-no-dvm", "test-standalone", None),
    ("test-no-dvm", "@dispvm", None), ("test-standalone", "@default", None),
]  # fmt: skip


@pytest.mark.parametrize(("source", "target", "index"), FIND_RULE)
def test_tc20_010_first_matching_rule_wins_and_no_match_denies(
    source: str, target: str, index: int | None
) -> None:
    pol = policy(FIND_RULE_POLICY)
    kwargs = {"service": SVC, "argument": ARG, "source": source, "target": target}
    if index is None:
        with pytest.raises(AccessDenied):
            pol.find_rule(**kwargs, system_info=INFO)
    else:
        assert pol.find_rule(**kwargs, system_info=INFO) is pol.rules[index]


COLLECT_POLICY = """\
* * test-vm1 test-vm2 allow
* * test-vm1 @anyvm ask
* * test-vm2 @tag:tag1 deny
* * test-vm2 @tag:tag2 allow
* * test-no-dvm @type:AppVM deny
* * @type:AppVM @default allow target=test-vm3
* * @tag:tag1 @type:AppVM allow
* * test-no-dvm @dispvm allow
* * test-standalone @dispvm allow
* * test-standalone @adminvm allow
* * uuid:c9024a97-9b15-46cc-8341-38d75d5d421b bogus2 deny
* * uuid:c798d6db-360f-473a-b902-1cc58ffd3ab0 uuid:6d7a02b5-532b-467f-b9fb-6596bae03c33 ask
* * test2-vm1 @dispvm:uuid:91e4fe8d-083b-4ddf-ad7b-fb4ebac537b9 ask
"""
_VM1_CHOICES = [
    "@dispvm:default-dvm", "@dispvm:test-vm3", "@dispvm:test-vm4", "default-dvm",
    "test-invalid-dvm", "test-no-dvm", "test-relayvm1", "test-remotevm1", "test-standalone",
    "test-template", "test-vm2", "test-vm3", "test-vm4", "test2-relayvm1", "test2-relayvm2",
    "test2-remotevm1", "test2-remotevm2", "test2-vm1",
]  # fmt: skip
COLLECT = {
    "test-vm1": _VM1_CHOICES,
    "test-vm2": ["test-vm3"],
    "test-vm3": [],
    "test-standalone": [
        "@dispvm:default-dvm",
        "default-dvm",
        "dom0",
        "test-invalid-dvm",
        "test-no-dvm",
        "test-relayvm1",
        "test-vm1",
        "test-vm2",
        "test-vm3",
        "test-vm4",
        "test2-relayvm1",
        "test2-relayvm2",
        "test2-vm1",
    ],
    "test-no-dvm": [],
    "test2-vm1": ["test-standalone", "@dispvm:test-vm4", "test-vm3"],
}


@pytest.mark.parametrize(("source", "expected"), COLLECT.items(), ids=COLLECT)
def test_tc20_020_collect_targets_for_ask(source: str, expected: list[str]) -> None:
    got = policy(COLLECT_POLICY).collect_targets_for_ask(
        service=SVC, argument=ARG, source=source, system_info=INFO
    )
    assert sorted(got) == sorted(expected)


# --- TC_40_evaluate ---------------------------------------------------------------------------

BASE_40 = """\
* * test-vm1 test-vm2 allow
* * test-vm1 @default allow target=test-vm2
* * @tag:tag1 test-vm2 ask
* * @tag:tag1 test-vm3 ask default_target=test-vm3
* * @tag:tag2 @anyvm allow
* * test-vm3 @anyvm deny"""
_ASK_ALL = [
    "@dispvm:default-dvm", "@dispvm:test-vm3", "@dispvm:test-vm4", "default-dvm",
    "test-invalid-dvm", "test-no-dvm", "test-relayvm1", "test-remotevm1", "test-template",
    "test-vm1", "test-vm2", "test-vm3", "test-vm4", "test2-relayvm1", "test2-relayvm2",
    "test2-remotevm1", "test2-remotevm2", "test2-vm1",
]  # fmt: skip
_STANDALONE_UUID = "uuid:6d7a02b5-532b-467f-b9fb-6596bae03c33"
_D0_NAMES = ("dom0", "@adminvm", _D0)

# (id, policy, source, target, expected) with expected one of
#   ("allow", target, requested_target, rule_index)
#   ("ask", sorted targets, default_target, rule_index)
#   ("deny", notify or None for "don't care")
EVALUATE = [
    ("000_deny", "* * @anyvm @anyvm deny", "test-vm1", "test-vm2", ("deny", True)),
    ("001_deny_no_notify", "* * @anyvm @anyvm deny notify=no", "test-vm1", "test-vm2",
     ("deny", False)),
    ("030_eval_simple", "* * test-vm1 test-vm2 allow", "test-vm1", "test-vm2",
     ("allow", "test-vm2", "test-vm2", 0)),
    ("030_eval_simple_no_match", "* * test-vm1 test-vm2 allow", "test-vm2", "@default",
     ("deny", None)),
    ("031_eval_default", BASE_40, "test-vm1", "@default", ("allow", "test-vm2", "@default", 1)),
    ("031_allow_without_any_target", BASE_40, "test-standalone", "@default", ("deny", None)),
    ("032_no_autostart_running", "* * test-vm1 test-vm2 allow autostart=no\n"
     "* * test-vm1 test-vm3 allow autostart=no", "test-vm1", "test-vm2",
     ("allow", "test-vm2", "test-vm2", 0)),
    ("032_no_autostart_halted", "* * test-vm1 test-vm2 allow autostart=no\n"
     "* * test-vm1 test-vm3 allow autostart=no", "test-vm1", "test-vm3", ("deny", None)),
    ("040_eval_ask", BASE_40, "test-standalone", "test-vm2", ("ask", _ASK_ALL, None, 2)),
    ("041_eval_ask_uuid_source", BASE_40, _STANDALONE_UUID, "test-vm3",
     ("ask", _ASK_ALL, "test-vm3", 3)),
    ("042_ask_no_targets", "* * test-vm3 @default ask", "test-vm3", "@default", ("deny", None)),
    ("043_ask", "* * test-vm1 @anyvm ask", "test-vm1", "test-vm2",
     ("ask", sorted([*_VM1_CHOICES]), None, 0)),
    ("043_ask_no_autostart", "* * test-vm1 @anyvm ask autostart=no", "test-vm1", "test-vm2",
     ("ask", ["test-relayvm1", "test-remotevm1", "test-vm2", "test2-relayvm1", "test2-relayvm2",
              "test2-remotevm1", "test2-remotevm2", "test2-vm1"], None, 0)),
    ("043_ask_invalid_default_target", "* * test-vm3 test-vm2 ask default_target=test-vm1",
     "test-vm3", "test-vm2", ("ask", ["test-vm2"], None, 0)),
    ("050_resolve_dispvm", "* * test-vm3 @dispvm allow", "test-vm3", "@dispvm",
     ("allow", "@dispvm:default-dvm", "@dispvm", 0)),
    ("051_resolve_dispvm_fail", "* * test-no-dvm @dispvm allow", "test-no-dvm", "@dispvm",
     ("deny", None)),
    ("053_dispvm_from_any", "* * @anyvm @dispvm allow", "test-vm3", "@dispvm",
     ("allow", "@dispvm:default-dvm", "@dispvm", 0)),
    ("054_dispvm_from_target", "* * @anyvm @anyvm allow target=@dispvm", "test-vm3", "test-vm1",
     ("allow", "@dispvm:default-dvm", "test-vm1", 0)),
    ("060_to_dom0", "* * test-vm3 @adminvm allow", "test-vm3", "dom0",
     ("allow", "dom0", "dom0", 0)),
    ("061_to_dom0_keyword", "* * test-vm3 @adminvm allow", "test-vm3", "@adminvm",
     ("allow", "dom0", "@adminvm", 0)),
    ("062_to_dom0_literal", "* * test-vm3 dom0 allow", "test-vm3", "dom0",
     ("allow", "dom0", "dom0", 0)),
    ("063_to_dom0_literal_policy", "* * test-vm3 dom0 allow", "test-vm3", "@adminvm",
     ("allow", "dom0", "@adminvm", 0)),
    *[(f"064_dom0_{t}_not_matched_by_name", "* * test-vm3 test-vm2 allow", "test-vm3", t,
       ("deny", None)) for t in _D0_NAMES],
    *[(f"064_rule_{t}_does_not_match_name", f"* * test-vm3 {t} allow", "test-vm3", "test-vm2",
       ("deny", None)) for t in _D0_NAMES],
    *[(f"070_073_ask_{t}_default_{d}", f"* * test-vm3 {t} ask default_target={d}", "test-vm3",
       "dom0", ("ask", ["dom0"], "dom0", 0))
      for t in ("dom0", "@adminvm") for d in ("dom0", "@adminvm")],
    *[(f"074_ask_target_{t}_default_{d}",
       f"* * test-vm3 @default ask target={t} default_target={d}",
       "test-vm3", "@default", ("ask", ["dom0"], "dom0", 0)) for t in _D0_NAMES for d in _D0_NAMES],
    ("055_ask_default_dispvm", "* * @anyvm @anyvm ask default_target=@dispvm\n"
     "* * @anyvm @dispvm ask", "test-vm3", "test-vm1",
     ("ask", None, "@dispvm:default-dvm", 0)),
    ("080_override_target", "* * @anyvm @anyvm allow target=test-vm2", "test-vm3", "test-vm1",
     ("allow", "test-vm2", "test-vm1", 0)),
    ("081_override_dispvm", "* * @anyvm @anyvm allow target=@dispvm", "test-vm3", "test-vm1",
     ("allow", "@dispvm:default-dvm", "test-vm1", 0)),
    ("082_override_dispvm_specific", "* * @anyvm @anyvm allow target=@dispvm:test-vm3",
     "test-vm3", "test-vm1", ("allow", "@dispvm:test-vm3", "test-vm1", 0)),
    ("083_override_dispvm_none", "* * @anyvm @anyvm allow target=@dispvm", "test-no-dvm",
     "test-vm1", ("deny", None)),
    ("084_override_dom0", "* * @anyvm @anyvm allow target=dom0", "test-vm3", "test-vm1",
     ("allow", "dom0", "test-vm1", 0)),
    ("085_override_adminvm", "* * @anyvm @anyvm allow target=@adminvm", "test-vm3", "test-vm1",
     ("allow", "dom0", "test-vm1", 0)),
    ("086_override_invalid", "* * test-vm3 @anyvm allow target=no-such-vm", "test-vm3",
     "@default", ("deny", None)),
    ("087_override_uuid",
     "* * @anyvm @anyvm allow target=uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4", "test-vm3",
     "test-vm1", ("allow", "uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4", "test-vm1", 0)),
    ("088_override_uuid_dom0", f"* * @anyvm @anyvm allow target={_D0}", "test-vm3", "test-vm1",
     ("allow", _D0, "test-vm1", 0)),
    ("089_override_dispvm_uuid",
     "* * @anyvm @anyvm allow target=@dispvm:uuid:fa6d56e8-a89d-4106-aa62-22e172a43c8b",
     "test-vm3", "test-vm1",
     ("allow", "@dispvm:uuid:fa6d56e8-a89d-4106-aa62-22e172a43c8b", "test-vm1", 0)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "source", "target", "expected"),
    [case[1:] for case in EVALUATE],
    ids=[f"TC_40_{case[0]}" for case in EVALUATE],
)
def test_tc40_evaluate(text: str, source: str, target: str, expected: tuple) -> None:  # type: ignore[type-arg]
    pol = policy(text)
    if expected[0] == "deny":
        with pytest.raises(AccessDenied) as err:
            evaluate(pol, source, target)
        if expected[1] is not None:
            assert err.value.notify is expected[1]
        return
    resolution = evaluate(pol, source, target)
    if expected[0] == "allow":
        _, want_target, want_requested, index = expected
        assert isinstance(resolution, AllowResolution)
        assert (resolution.target, resolution.requested_target) == (want_target, want_requested)
    else:
        _, want_targets, want_default, index = expected
        assert isinstance(resolution, AskResolution)
        if want_targets is not None:
            assert list(resolution.targets_for_ask) == sorted(want_targets)
        assert resolution.default_target == want_default
    assert resolution.rule is pol.rules[index]


def _ask(text: str = "* * @anyvm @anyvm ask") -> AskResolution:
    resolution = evaluate(policy(text), "test-vm1", "test-vm2")
    assert isinstance(resolution, AskResolution)
    return resolution


@pytest.mark.parametrize(("suffix", "notify"), [("", False), (" notify=yes", True)])
def test_tc40_110_111_user_allows_an_offered_target(suffix: str, notify: bool) -> None:
    allowed = _ask(f"* * @anyvm @anyvm ask{suffix}").allow("test-vm2")
    assert (allowed.target, allowed.notify, allowed.requested_target) == (
        "test-vm2",
        notify,
        "test-vm2",
    )


def test_tc40_112_user_choice_outside_the_offer_is_refused_with_notify() -> None:
    with pytest.raises(AccessDenied, match="not a valid choice") as err:
        _ask("* * @anyvm test-vm2 ask target=test-vm2").allow("test-no-dvm")
    assert err.value.notify is True


@pytest.mark.parametrize(("suffix", "notify"), [("", False), (" notify=yes", True)])
def test_tc40_113_114_user_denial_carries_the_rules_notify(suffix: str, notify: bool) -> None:
    assert _ask(f"* * @anyvm @anyvm ask{suffix}").deny().notify is notify


# Daemon answer lines (TC_40 test_120 .. test_134), as (policy, source, target, lines).
_VM2_UUID = "uuid:b3eb69d0-f9d9-4c3c-ad5c-454500303ea4"
DAEMON = [
    ("120_execute", "* * @anyvm @anyvm allow", "test-vm1", "test-vm2", None,
     ["user=DEFAULT", "result=allow", "target=test-vm2", f"target_uuid={_VM2_UUID}",
      "autostart=True", "requested_target=test-vm2"]),
    ("121_execute_dom0", "* * @anyvm dom0 allow", "test-vm1", "dom0", None,
     ["user=DEFAULT", "result=allow", "target=dom0", "autostart=True", "requested_target=dom0"]),
    ("121_execute_dom0_keyword", "* * @anyvm dom0 allow", "test-vm1", "@adminvm", None,
     ["user=DEFAULT", "result=allow", "target=dom0", "autostart=True",
      "requested_target=@adminvm"]),
    ("122_execute_dispvm", "* * @anyvm @dispvm:default-dvm allow", "test-vm1",
     "@dispvm:default-dvm", None,
     ["user=DEFAULT", "result=allow", "target=@dispvm:default-dvm",
      "target_uuid=@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21", "autostart=True",
      "requested_target=@dispvm:default-dvm"]),
    ("124_local_to_remotevm", "* * test-vm1 test-remotevm1 allow", "test-vm1", "test-remotevm1",
     None,
     ["user=DEFAULT", "result=allow", "target=test-relayvm1",
      "target_uuid=uuid:355304b8-bd5e-4699-9a2b-b6864fc26f6b", "autostart=True",
      "requested_target=test-remotevm1",
      "service=qubesair.SSHProxy+test-remotevm1+test.Service+argument"]),
    ("125_remote_to_local_policy_source", "* * test2-remotevm1 test2-vm1 allow", "test2-relayvm1",
     "test2-vm1", "test2-remotevm1",
     ["user=DEFAULT", "result=allow", "target=test2-vm1",
      "target_uuid=uuid:c798d6db-360f-473a-b902-1cc58ffd3ab0", "autostart=True",
      "requested_target=test2-vm1", "policy_source=test2-remotevm1"]),
    ("128_remote_to_remote", "* * test2-remotevm1 test2-remotevm2 allow", "test2-relayvm1",
     "test2-remotevm2", "test2-remotevm1",
     ["user=DEFAULT", "result=allow", "target=test2-relayvm2",
      "target_uuid=uuid:044767bb-081e-4260-b7be-35e77c36d510", "autostart=True",
      "requested_target=test2-remotevm2",
      "service=qubesair.SSHProxy+test2-remotevm2+test.Service+argument",
      "policy_source=test2-remotevm1"]),
    ("129_remote_to_dispvm", "* * @anyvm @dispvm:default-dvm allow", "test-relayvm1",
     "@dispvm:default-dvm", "test-remotevm1",
     ["user=DEFAULT", "result=allow", "target=@dispvm:default-dvm",
      "target_uuid=@dispvm:uuid:f3e538bd-4427-4697-bed7-45ef3270df21", "autostart=True",
      "requested_target=@dispvm:default-dvm", "policy_source=test-remotevm1"]),
    ("134_remotevm_ignores_user", "* * test-vm1 test-remotevm1 allow user=toto", "test-vm1",
     "test-remotevm1", None,
     ["user=DEFAULT", "result=allow", "target=test-relayvm1",
      "target_uuid=uuid:355304b8-bd5e-4699-9a2b-b6864fc26f6b", "autostart=True",
      "requested_target=test-remotevm1",
      "service=qubesair.SSHProxy+test-remotevm1+test.Service+argument"]),
    ("user_is_passed", "* * @anyvm @anyvm allow user=root autostart=no", "test-vm1", "test-vm2",
     None,
     ["user=root", "result=allow", "target=test-vm2", f"target_uuid={_VM2_UUID}",
      "autostart=False", "requested_target=test-vm2"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "source", "target", "requested_source", "lines"),
    [case[1:] for case in DAEMON],
    ids=[f"TC_40_{case[0]}" for case in DAEMON],
)
def test_tc40_12x_daemon_answer_lines(
    text: str, source: str, target: str, requested_source: str | None, lines: list[str]
) -> None:
    resolution = policy(text).evaluate(
        service=SVC,
        argument=ARG,
        source=source,
        target=target,
        system_info=INFO,
        requested_source=requested_source,
    )
    assert isinstance(resolution, AllowResolution)
    assert resolution.daemon_lines(INFO) == lines


@pytest.mark.parametrize(
    ("relay", "requested_source", "message"),
    [
        ("test2-relayvm2", "test2-remotevm1", "test2-relayvm2 is not a relay for test2-remotevm1"),
        (
            "test2-relayvm1",
            "test-vm3",
            "test-vm3: requested source is only authorized for RemoteVM",
        ),
        ("test-relayvm1", "test-unexistent", "unknown requested source qube 'test-unexistent'"),
    ],
    ids=["126_relay_impersonates_relay", "127_relay_impersonates_local", "130_unknown_source"],
)
def test_tc40_relayed_request_from_the_wrong_relay_is_refused(
    relay: str, requested_source: str, message: str
) -> None:
    with pytest.raises(AccessDenied) as err:
        policy("* * @anyvm @anyvm allow").evaluate(
            service=SVC,
            argument=ARG,
            source=relay,
            target="test2-vm1",
            system_info=INFO,
            requested_source=requested_source,
        )
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("missing", "message"),
    [("transport_rpc", "test-remotevm1: transport RPC is not set"),
     ("relayvm", "test-remotevm1: relayvm is not set")],
)  # fmt: skip
def test_tc40_131_132_remotevm_without_route_is_refused(missing: str, message: str) -> None:
    raw = json.loads(json.dumps(RAW_INFO))
    del raw["domains"]["test-remotevm1"][missing]
    info = SystemInfo.from_json(raw)
    resolution = evaluate(
        policy("* * test-vm1 test-remotevm1 allow"), "test-vm1", "test-remotevm1", info
    )
    assert isinstance(resolution, AllowResolution)
    with pytest.raises(AccessDenied) as err:
        resolution.daemon_lines(info)
    assert str(err.value) == message


def test_tc40_133_loopback_is_refused_when_answering() -> None:
    resolution = evaluate(policy("* * test-vm1 @anyvm allow"), "test-vm1", "test-vm1")
    assert isinstance(resolution, AllowResolution)
    with pytest.raises(AccessDenied, match=r"^loopback qrexec connection not supported$"):
        resolution.daemon_lines(INFO)
