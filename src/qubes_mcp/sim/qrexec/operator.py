"""Who answers ``ask`` rules. In real Qubes the operator clicks a dialog in the GUI qube; in the
emulator a pluggable operator answers, and the default says no (no answer means no)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class AskOperator(Protocol):
    def ask(
        self,
        source: str,
        service_and_arg: str,
        targets: tuple[str, ...],
        default_target: str | None,
    ) -> str | None:
        """The chosen target (one of ``targets``), or ``None`` to deny."""
        ...


class DenyAllOperator:
    """Denies every question (the default: an operator who is not there)."""

    def ask(
        self,
        source: str,
        service_and_arg: str,
        targets: tuple[str, ...],
        default_target: str | None,
    ) -> str | None:
        return None


@dataclass(frozen=True)
class Question:
    source: str
    service_and_arg: str
    targets: tuple[str, ...]
    default_target: str | None


@dataclass
class ScriptedOperator:
    """Answers from a script, for tests and demos, and records every question asked.

    ``answers`` is either a sequence consumed in order (``None`` = deny; once exhausted, deny)
    or a mapping from ``service+arg`` or ``(source, service+arg)`` to the answer. The special
    answer ``"@default"`` picks the question's default target.
    """

    answers: Sequence[str | None] | Mapping[object, str | None] = ()
    asked: list[Question] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ask(
        self,
        source: str,
        service_and_arg: str,
        targets: tuple[str, ...],
        default_target: str | None,
    ) -> str | None:
        with self._lock:
            self.asked.append(Question(source, service_and_arg, targets, default_target))
            if isinstance(self.answers, Mapping):
                answer = self.answers.get(
                    (source, service_and_arg), self.answers.get(service_and_arg)
                )
            elif self._next < len(self.answers):
                answer = self.answers[self._next]
                self._next += 1
            else:
                answer = None
        if answer == "@default":
            return default_target
        return answer
