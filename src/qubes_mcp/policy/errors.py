"""The policy engine's refusals: every failure is a deny, by type.

qrexec roots its refusals in ``AccessDenied`` and makes ``PolicySyntaxError`` a subclass of it
(``qrexec/exc.py``). We keep one common root, :class:`PolicyError`, and split it by cause:
a policy that does not parse (the operator's fault, reported with file and line) is not the
same thing as a request that the policy refuses. A caller that only wants "allowed or not"
catches :class:`PolicyError`; nothing in this package ever answers "allow" by default.
"""

from __future__ import annotations

from pathlib import PurePath


class PolicyError(Exception):
    """Root of every policy failure. Catching it and refusing is always correct."""


class PolicySyntaxError(PolicyError):
    """The policy (or a file it includes) cannot be loaded; qrexec then denies every call.

    ``str()`` reads ``FILE:LINE: message``, the format of qrexec's ``PolicySyntaxError``;
    ``LINE`` is 0 for problems that concern a whole file (bad file name, unreadable file).

    Attributes:
        filepath: The file at fault, or None when unknown.
        lineno: The 1-based line number, 0 for whole-file problems.
        msg: The message without the location prefix.
    """

    def __init__(self, filepath: PurePath | str | None, lineno: int | None, msg: str) -> None:
        self.filepath = filepath
        self.lineno = lineno or 0
        self.msg = msg
        super().__init__(f"{filepath or '<unknown>'}:{self.lineno}: {msg}")


class AccessDenied(PolicyError):  # noqa: N818 - qrexec's name, which readers of qrexec know
    """The request is refused: a deny rule, no matching rule, or an impossible resolution.

    Attributes:
        notify: Whether qrexec would show a "denied" notification to the user
            (a ``deny notify=no`` rule clears it).
    """

    def __init__(self, msg: str, *, notify: bool = True) -> None:
        super().__init__(msg)
        self.notify = notify


class SystemInfoError(PolicyError):
    """The system information (``internal.GetSystemInfo`` JSON) is malformed."""
