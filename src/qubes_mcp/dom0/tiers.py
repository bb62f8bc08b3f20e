"""Scope vocabulary and the tier ladder.

A *scope* is a tag prefix (default ``ai``) and a list of enrolled names in dom0's registry
(``enrolment.py``). A qube is in a scope only when both agree (decision record 0010): it is
registered there under its current uuid **and** it carries the scope's tag. Tags alone confer
nothing, because Qubes copies them: a disposable inherits every tag of its disposable template
and ``qvm-clone`` copies every tag, so the operator's own disposables and clones would
otherwise walk into an agent's scope. The vocabulary, all operator-only:

- ``<scope>-managed``: enrolled (with a ``member`` registration). Without both, a qube does not
  exist for the principal.
- ``<scope>-exec``, ``<scope>-net``, ``<scope>-full``: the tier; the highest present wins. Like
  guarded and owner, a tier tag on a qube that is not registered confers nothing.
- ``<scope>-dump``: a copy-in-only sink (with a ``dump`` registration). Never also enrolled;
  a qube carrying both is a misconfiguration and is treated as neither (fail closed;
  ``doctor`` reports it).
- ``<scope>-guarded``: every state-changing request on it waits for the operator.
- ``<scope>-owner-<principal>``: stamped by the gate on qubes a principal created.

The whole ``<scope>-`` tag namespace is controlled: create and clone paths strip every tag in
it (whatever the platform propagated) and stamp only what the gate decides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

SCOPE_RE = re.compile(r"\A[a-z][a-z0-9]{0,15}\Z")
#: the two roles a registration can have
MEMBER = "member"
DUMP = "dump"


class Tier(IntEnum):
    """Cumulative authority on one qube: ``read < exec < net < full``."""

    READ = 1
    EXEC = 2
    NET = 3
    FULL = 4

    @property
    def word(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, word: str) -> Tier:
        """``"exec"`` → ``Tier.EXEC``; raises ``ValueError`` for anything else."""
        for tier in cls:
            if tier.word == word:
                return tier
        raise ValueError(f"not a tier: {word!r} (read, exec, net, full)")


@dataclass(frozen=True)
class Scope:
    """The tag vocabulary of one scope prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not SCOPE_RE.match(self.prefix):
            raise ValueError(f"scope must match {SCOPE_RE.pattern}: {self.prefix!r}")

    @property
    def managed(self) -> str:
        return f"{self.prefix}-managed"

    @property
    def dump(self) -> str:
        return f"{self.prefix}-dump"

    @property
    def guarded(self) -> str:
        return f"{self.prefix}-guarded"

    def tier_tag(self, tier: Tier) -> str | None:
        """The tag that grants ``tier`` (``None`` for read: enrolment is the read floor)."""
        return None if tier is Tier.READ else f"{self.prefix}-{tier.word}"

    def owner(self, principal: str) -> str:
        return f"{self.prefix}-owner-{principal}"

    def born_by(self, principal: str) -> str:
        """The registry's ``by`` of a qube the gate created for ``principal``; only the gate
        writes it (``Context.enter_scope``), and only at the end of a birth."""
        return f"gate:{principal}"

    def is_controlled(self, tag: str) -> bool:
        """True for every tag in this scope's namespace (operator- or gate-only)."""
        return tag.startswith(f"{self.prefix}-")

    def is_enrolled(self, tags: Iterable[str], registered: str | None) -> bool:
        """THE membership predicate: registered as a member (under the qube's current uuid:
        ``registered`` is what ``Registry.role_of`` answered) and tagged, and not a dump."""
        tagset = set(tags)
        return registered == MEMBER and self.managed in tagset and self.dump not in tagset

    def is_dump_sink(self, tags: Iterable[str], registered: str | None) -> bool:
        """The same for a dump sink: registered as a dump and tagged, and not also managed."""
        tagset = set(tags)
        return registered == DUMP and self.dump in tagset and self.managed not in tagset

    def literal_tier(
        self, tags: Iterable[str], registered: str | None, default: Tier
    ) -> Tier | None:
        """The tier the tags grant, or ``None`` when not enrolled (tier tags on a qube that is
        not registered grant nothing: they may have been inherited)."""
        tagset = set(tags)
        if not self.is_enrolled(tagset, registered):
            return None
        for tier in (Tier.FULL, Tier.NET, Tier.EXEC):
            if self.tier_tag(tier) in tagset:
                return tier
        return default


def effective_tier(
    scope: Scope, tags: Iterable[str], registered: str | None, default: Tier, ceiling: Tier
) -> Tier | None:
    """min(tier(Q), ceiling(P)) for an enrolled qube; ``None`` (does not exist) otherwise."""
    literal = scope.literal_tier(tags, registered, default)
    return None if literal is None else min(literal, ceiling)
