"""Name and charset rules of qubesd R4.3 (``qubes/vm/__init__.py``, ``qubes/api/admin.py``).

Every caller-supplied name passes one of these checks before it is used. The error classes
and messages are the ones qubesd sends, because clients match on them.
"""

from __future__ import annotations

import re
import string

from qubes_mcp.sim import exc

VM_NAME_MAX = 31
_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]*\Z")
_NAME_BAD_START_RE = re.compile(r"\A[0-9_.-]")
_TAG_RE = re.compile(r"\A[a-zA-Z0-9_-]*\Z")
FEATURE_NAME_RE = re.compile(r"\A[a-zA-Z0-9_.-]+\Z")
FEATURE_VALUE_RE = re.compile(r"\A[\x20-\x7E]*\Z")
LABEL_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
USERNAME_CHARS = string.ascii_letters + string.digits + "_-+,."
UUID_RE = re.compile(r"\A[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\Z")


def validate_name(value: str, prop: str | None = None, holder: str | None = None) -> str:
    """Check a qube name like R4.3 ``validate_name``.

    Args:
        value: The candidate name (already ASCII-decoded).
        prop: Property name when validating a property value (changes the messages).
        holder: ``repr`` of the property holder, needed with ``prop``.

    Returns:
        The name, unchanged.

    Raises:
        QubesValueError: Or QubesPropertyValueError when ``prop`` is given.
    """

    def fail(plain: str, with_prop: str) -> exc.QubesException:
        if prop is not None:
            return exc.QubesPropertyValueError(holder or "", prop, value, with_prop)
        return exc.QubesValueError(plain)

    if len(value) > VM_NAME_MAX:
        raise fail(
            "VM name must be shorter than 32 characters",
            f"{prop} value must be shorter than 32 characters",
        )
    if _NAME_BAD_START_RE.match(value):
        raise fail(
            "VM name cannot start with hyphen, underscore, dot or numbers",
            f"{prop} cannot start with hyphen, underscore, dot or numbers",
        )
    if not _NAME_RE.match(value):
        raise fail(
            "VM name contains illegal characters", f"{prop} value contains illegal characters"
        )
    if value == "Domain-0":
        raise exc.QubesValueError("VM name cannot be 'Domain-0'")
    if value in ("none", "default"):
        raise exc.QubesValueError("VM name cannot be 'none' nor 'default'")
    if value.endswith("-dm"):
        raise exc.QubesValueError("VM name cannot end with -dm")
    return value


def validate_tag(tag: str) -> str:
    """R4.3 ``Tags.validate_tag``: a bad tag is a plain ``ValueError`` (zero-byte reply).

    R4.3 accepts the empty tag; main rejects it.
    """
    if not _TAG_RE.match(tag):
        raise ValueError("Tag contains invalid characters")
    return tag


def is_valid_label_name(name: str) -> bool:
    """Label names in Create payloads: not all digits, ``[A-Za-z0-9_.-]``."""
    return not name.isdigit() and all(c in LABEL_CHARS for c in name)
