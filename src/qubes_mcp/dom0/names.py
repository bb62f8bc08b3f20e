"""Qube names: the one charset every caller-supplied name is checked against before use.

The rule is qubesd's own (``qubes/vm/__init__.py`` ``validate_name``): at most 31 characters,
a letter first, then letters, digits, ``_ . -``; not ``none``/``default``/``Domain-0``; not
ending in ``-dm``. ``\\A…\\Z`` anchors, so a trailing newline never passes (the prior art's
``dom0\\n`` finding).
"""

from __future__ import annotations

import re

QUBE_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
_RESERVED = frozenset({"none", "default", "Domain-0"})


def is_valid_qube_name(untrusted_name: object) -> bool:
    """Whether ``untrusted_name`` is a string qubesd would accept as a qube name."""
    return (
        isinstance(untrusted_name, str)
        and QUBE_NAME_RE.match(untrusted_name) is not None
        and untrusted_name not in _RESERVED
        and not untrusted_name.endswith("-dm")
    )
