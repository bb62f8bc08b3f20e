"""Hostile policy text: the parser only ever raises PolicySyntaxError, and a policy that does not
parse never allows anything."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_mcp.dom0.operator.cli import main
from qubes_mcp.policy import Policy, PolicySyntaxError
from qubes_mcp.policy.rules import parse_rule

SYSTEM_INFO = Path(__file__).parents[1] / "conformance" / "data" / "policy_qrexec_system_info.json"

# Pieces that reach deep into the grammar, plus whitespace Python splits on and raw noise.
PIECES = [
    "*", "+", "+arg", "qubes.Svc", "@anyvm", "@default", "@dispvm", "@dispvm:default-dvm",
    "@dispvm:@tag:t", "@tag:t", "@type:AppVM", "@adminvm", "dom0", "test-vm1",
    "uuid:00000000-0000-0000-0000-000000000000", "allow", "deny", "ask", "target=test-vm2",
    "target=@dispvm", "default_target=@adminvm", "user=root", "notify=yes", "autostart=no",
    "x=y", "=", "#", "!include", "!include-dir", "!include-service", "!compat-4.0", "$anyvm",
    ",", "@", "\u00a0", "\u2028", "\x0b", "\x1c", "\r", "\n", "\t", " ", "\x00", "include/x",
    "..", "/", "é",
]  # fmt: skip
policy_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=40).map(
    " ".join
)


@settings(max_examples=400, deadline=None)
@given(text=policy_text, include=policy_text)
def test_parser_only_ever_raises_policy_syntax_error(text: str, include: str) -> None:
    try:
        policy = Policy.from_texts({"30-fuzz.policy": text, "include/x": include})
    except PolicySyntaxError:
        return
    for rule in policy.rules:
        assert rule.lineno >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_bytes_on_disk_only_ever_raise_policy_syntax_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "30-fuzz.policy").write_bytes(data)
        with contextlib.suppress(PolicySyntaxError):
            Policy.load([Path(tmp)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=policy_text)
def test_a_policy_that_fails_to_parse_allows_nothing(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        # An allow-everything file that the broken file must not let through.
        (directory / "90-allow.policy").write_text("* * @anyvm @anyvm allow target=test-vm2\n")
        (directory / "30-fuzz.policy").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            Policy.load([directory])
            parsed = True
        except PolicySyntaxError:
            parsed = False
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = main(["policy", "eval", "--dir", tmp, "--system-info", str(SYSTEM_INFO),
                           "test-vm1", "test-vm3", "qubes.Svc"])  # fmt: skip
        assert status == 0
        if not parsed:
            assert out.getvalue() == "result=deny\n"


_NAMES = st.sampled_from(["test-vm1", "dom0", "uuid:00000000-0000-0000-0000-000000000000"])
_SRC = st.one_of(_NAMES, st.sampled_from(["@anyvm", "*", "@adminvm", "@tag:t", "@type:AppVM"]))
_TGT = st.one_of(_SRC, st.sampled_from(["@default", "@dispvm", "@dispvm:dvm", "@dispvm:@tag:t"]))
_RED = st.one_of(_NAMES, st.sampled_from(["@adminvm", "@dispvm", "@dispvm:dvm"]))


@st.composite
def valid_lines(draw: st.DrawFn) -> str:
    service = draw(st.sampled_from(["*", "qubes.Svc", "admin.vm.List"]))
    argument = "*" if service == "*" else draw(st.sampled_from(["*", "+", "+arg.x-1_2"]))
    action = draw(st.sampled_from(["allow", "deny", "ask"]))
    params = []
    if action != "deny" and draw(st.booleans()):
        params.append("target=" + draw(_RED))
    if action == "ask" and draw(st.booleans()):
        params.append("default_target=" + draw(_RED))
    if action != "deny" and draw(st.booleans()):
        params.append("user=" + draw(st.sampled_from(["root", "user"])))
    if draw(st.booleans()):
        params.append("notify=" + draw(st.sampled_from(["yes", "no"])))
    if action != "deny" and draw(st.booleans()):
        params.append("autostart=" + draw(st.sampled_from(["yes", "no"])))
    target = draw(_TGT)
    if target == "@default" and action == "allow" and not any("target=" in p for p in params):
        params.insert(0, "target=dom0")
    return "\t".join([service, argument, draw(_SRC), target, " ".join([action, *params])])


@settings(max_examples=300, deadline=None)
@given(line=valid_lines())
def test_valid_rule_round_trips_through_its_text(line: str) -> None:
    rule = parse_rule(line, filepath="f", lineno=1)
    again = parse_rule(str(rule), filepath="f", lineno=1)
    assert again == rule


def test_the_fuzz_fixture_is_the_qrexec_one() -> None:
    assert "test-vm3" in json.loads(SYSTEM_INFO.read_text())["domains"]
