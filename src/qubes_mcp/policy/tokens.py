"""Qube specifications (tokens) of the policy language: where each is legal, what it matches.

A token appears in one of four *contexts* (QX ``parser.py`` ``Source``, ``Target``,
``Redirect``, ``IntendedTarget``); each kind of token is legal only in some of them
(reference §5.3):

=================  ======  ======  ========  ========
kind               source  target  redirect  intended
=================  ======  ======  ========  ========
name / ``uuid:``   yes     yes     yes       yes
``*``              yes     yes
``@adminvm``       yes     yes     yes       yes
``@anyvm``         yes     yes
``@default``               yes               yes
``@type:T``        yes     yes
``@tag:T``         yes     yes
``@dispvm``                yes     yes       yes
``@dispvm:Q``      yes     yes     yes       yes
``@dispvm:@tag:T`` yes     yes
=================  ======  ======  ========  ========

Anything that does not start with ``@`` (and is not ``*``) is a qube name: the policy
language does not check name syntax, qrexec does not either. ``dom0``, ``@adminvm`` and
``uuid:00000000-0000-0000-0000-000000000000`` all mean dom0 (R4.3 keeps the spelling and
compares with :func:`is_dom0`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

from qubes_mcp.policy.errors import AccessDenied, PolicySyntaxError
from qubes_mcp.policy.sysinfo import SystemInfo

DOM0_SPELLINGS = frozenset({"@adminvm", "dom0", "uuid:00000000-0000-0000-0000-000000000000"})
DISPVM_PREFIX = "@dispvm:"


def is_dom0(text: str) -> bool:
    """Whether ``text`` is one of the three spellings of dom0."""
    return text in DOM0_SPELLINGS


class Context(enum.Enum):
    """Where a token is written; the value is qrexec's word for it in error messages."""

    SOURCE = "source"
    TARGET = "target"
    REDIRECT = "redirect"
    INTENDED = "intendedtarget"


class Kind(enum.Enum):
    """The kinds of token."""

    NAME = "name"
    WILDCARD = "*"
    ADMINVM = "@adminvm"
    ANYVM = "@anyvm"
    DEFAULT = "@default"
    DISPVM = "@dispvm"
    TYPE = "@type:"
    TAG = "@tag:"
    DISPVM_TEMPLATE = "@dispvm:"
    DISPVM_TAG = "@dispvm:@tag:"


_S, _T, _R, _I = Context.SOURCE, Context.TARGET, Context.REDIRECT, Context.INTENDED
_LEGAL: dict[Kind, frozenset[Context]] = {
    Kind.NAME: frozenset({_S, _T, _R, _I}),
    Kind.WILDCARD: frozenset({_S, _T}),
    Kind.ADMINVM: frozenset({_S, _T, _R, _I}),
    Kind.ANYVM: frozenset({_S, _T}),
    Kind.DEFAULT: frozenset({_T, _I}),
    Kind.DISPVM: frozenset({_T, _R, _I}),
    Kind.TYPE: frozenset({_S, _T}),
    Kind.TAG: frozenset({_S, _T}),
    Kind.DISPVM_TEMPLATE: frozenset({_S, _T, _R, _I}),
    Kind.DISPVM_TAG: frozenset({_S, _T}),
}
_EXACT = (Kind.WILDCARD, Kind.ADMINVM, Kind.ANYVM, Kind.DEFAULT, Kind.DISPVM)
# qrexec tries prefixes in this order; a value that itself starts with "@" belongs to a
# longer prefix (``@dispvm:@tag:``) or makes the token invalid.
_PREFIXES = (Kind.TYPE, Kind.TAG, Kind.DISPVM_TEMPLATE, Kind.DISPVM_TAG)


@dataclass(frozen=True, slots=True)
class Token:
    """One parsed qube specification.

    Attributes:
        kind: What sort of specification it is.
        text: The token as written, e.g. ``@tag:work``.
        value: The part after the prefix (``work``), or ``text`` for names and keywords.
    """

    kind: Kind
    text: str
    value: str

    def __str__(self) -> str:
        return self.text


def parse_token(
    text: str,
    context: Context,
    *,
    filepath: PurePath | str | None = None,
    lineno: int | None = None,
) -> Token:
    """Parse ``text`` as a token legal in ``context``.

    Args:
        text: The token as written.
        context: Where it is written.
        filepath: For error messages.
        lineno: For error messages.

    Returns:
        The token.

    Raises:
        PolicySyntaxError: With qrexec's message for empty, unknown or misplaced tokens.
    """
    if not text:
        raise PolicySyntaxError(filepath, lineno, f"invalid empty {context.value} token")
    if not (text.startswith("@") or text == "*"):
        return Token(Kind.NAME, text, text)
    for kind in _EXACT:
        if context in _LEGAL[kind] and text == kind.value:
            return Token(kind, text, text)
    for kind in _PREFIXES:
        if context not in _LEGAL[kind] or not text.startswith(kind.value):
            continue
        value = text[len(kind.value) :]
        if not value:
            raise PolicySyntaxError(filepath, lineno, f"invalid empty {kind.value} token: {text!r}")
        if value.startswith("@"):
            continue
        return Token(kind, text, value)
    raise PolicySyntaxError(filepath, lineno, f"invalid {context.value} token: {text!r}")


def match_strings(info: SystemInfo, left: str, right: str) -> bool:
    """Compare two qube designations where either may be a ``uuid:`` form (QX ``match_strings``)."""
    if left.startswith("uuid:"):
        if right.startswith("uuid:"):
            return left == right
        domain = info.get(right)
        return domain is not None and domain.uuid is not None and left[5:] == domain.uuid
    if right.startswith("uuid:"):
        domain = info.get(left)
        return domain is not None and domain.uuid is not None and right[5:] == domain.uuid
    return left == right


def dispvm_template_of(info: SystemInfo, source: str) -> str | None:
    """What ``@dispvm`` means for ``source``: ``@dispvm:<default_dispvm>``, or None.

    Like qrexec, this does not check that the default is a disposable template.
    """
    domain = info.get(source)
    if domain is None or domain.default_dispvm is None:
        return None
    return DISPVM_PREFIX + domain.default_dispvm


def matches(
    token: Token, other: str, other_kind: Kind | None, source: str, info: SystemInfo
) -> bool:
    """Whether a rule's source/target ``token`` matches a request's qube.

    Args:
        token: The rule's token.
        other: The request's source name, or its (normalised) intended target.
        other_kind: The intended target's kind, or None when ``other`` is the source.
        source: The request's source (``@dispvm`` is resolved through its default_dispvm).
        info: The system information.

    Returns:
        Whether it matches.

    Raises:
        AccessDenied: Where qrexec's matcher crashes (``@dispvm`` from a source without a
            default disposable template, or one that does not exist), which its daemon
            turns into a refusal of the whole request.
    """
    kind = token.kind
    if kind is Kind.NAME:
        if is_dom0(token.text):
            return is_dom0(other)
        return match_strings(info, token.text, other)
    if kind is Kind.WILDCARD:
        return True
    if kind is Kind.ADMINVM:
        return is_dom0(other)
    if kind is Kind.ANYVM:
        return not is_dom0(other)
    if kind is Kind.DEFAULT or kind is Kind.DISPVM:
        return other == token.text
    if kind is Kind.TYPE or kind is Kind.TAG:
        domain = info.get(other)
        if domain is None:
            return False
        return domain.klass == token.value if kind is Kind.TYPE else token.value in domain.tags
    # The two disposable forms only ever match an intended target.
    if other_kind is Kind.DISPVM:
        template = dispvm_template_of(info, source)
        if template is None:
            if kind is Kind.DISPVM_TAG:
                return False
            raise AccessDenied(f"cannot match {token.text}: {source} has no default_dispvm")
    elif other_kind is Kind.DISPVM_TEMPLATE:
        template = other
    else:
        return False
    if kind is Kind.DISPVM_TEMPLATE:
        if other_kind is Kind.DISPVM:
            # qrexec compares the whole "@dispvm:..." strings here, so a uuid: spelling in
            # the rule does not match the name that default_dispvm holds.
            return match_strings(info, token.text, template)
        return match_strings(info, token.value, template[len(DISPVM_PREFIX) :])
    domain = info.get(template[len(DISPVM_PREFIX) :])
    if domain is None:
        raise AccessDenied(f"cannot match {token.text}: no such qube {template!r}")
    return domain.template_for_dispvms and token.value in domain.tags


def to_name(info: SystemInfo, text: str) -> str:
    """Turn ``uuid:U`` / ``@dispvm:uuid:U`` into the name form (QX ``uuid_to_name``).

    Raises:
        KeyError: When the uuid is unknown.
    """
    if text.startswith("uuid:"):
        return info[text].name
    if text.startswith(DISPVM_PREFIX + "uuid:"):
        return DISPVM_PREFIX + info[text[len(DISPVM_PREFIX) :]].name
    return text


def expand(token: Token, info: SystemInfo) -> Iterator[str]:
    """Every target this token could stand for, for the ``ask`` dialog (QX ``expand``).

    Raises:
        AccessDenied: For ``@dispvm:Q`` where Q is not a qube (qrexec crashes there).
    """
    kind = token.kind
    if kind is Kind.NAME:
        if token.text in info:
            yield to_name(info, token.text)
    elif kind is Kind.WILDCARD or kind is Kind.ANYVM:
        for domain in info.domains():
            if kind is Kind.WILDCARD or not is_dom0(domain.name):
                yield domain.name
            if domain.template_for_dispvms:
                yield DISPVM_PREFIX + domain.name
        yield Kind.DISPVM.value
    elif kind is Kind.ADMINVM or kind is Kind.DISPVM:
        yield token.text
    elif kind is Kind.TYPE or kind is Kind.TAG:
        for domain in info.domains():
            if (domain.klass == token.value) if kind is Kind.TYPE else (token.value in domain.tags):
                yield domain.name
    elif kind is Kind.DISPVM_TEMPLATE:
        template = info.get(token.value)
        if template is None:
            raise AccessDenied(f"cannot expand {token.text}: no such qube")
        if template.template_for_dispvms:
            yield to_name(info, token.text)
    elif kind is Kind.DISPVM_TAG:
        for domain in info.domains():
            if token.value in domain.tags and domain.template_for_dispvms:
                yield DISPVM_PREFIX + domain.name
    # @default expands to nothing.
