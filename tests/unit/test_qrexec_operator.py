"""Who answers ``ask``: nobody by default; a script in tests and demos."""

from __future__ import annotations

from qubes_mcp.sim.qrexec.operator import DenyAllOperator, Question, ScriptedOperator

TARGETS = ("vault", "work")


def test_default_operator_denies() -> None:
    assert DenyAllOperator().ask("work", "qubes.Filecopy+", TARGETS, "vault") is None


def test_scripted_sequence_then_deny_when_exhausted() -> None:
    op = ScriptedOperator(["vault", None])
    answers = [op.ask("personal", "qubes.Filecopy+", TARGETS, None) for _ in range(3)]
    assert answers == ["vault", None, None]
    assert op.asked[0] == Question("personal", "qubes.Filecopy+", TARGETS, None)


def test_scripted_mapping_prefers_source_specific_answer() -> None:
    op = ScriptedOperator({("work", "svc+"): "vault", "svc+": "work"})
    assert op.ask("work", "svc+", TARGETS, None) == "vault"
    assert op.ask("personal", "svc+", TARGETS, None) == "work"
    assert op.ask("personal", "other+", TARGETS, None) is None


def test_default_answer_picks_the_default_target() -> None:
    op = ScriptedOperator(["@default"])
    assert op.ask("personal", "svc+", TARGETS, "work") == "work"
