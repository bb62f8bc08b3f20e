"""One policy line: ``SERVICE ARGUMENT SOURCE TARGET ACTION [PARAM=VALUE ...]``.

The checks and their order follow qrexec's ``Rule.__init__`` (QX ``parser.py``) so that a
line is rejected by the same check, with the same message, as on a real dom0:
service and argument charset, source token, target token, action name, parameter syntax,
duplicate parameters, boolean values, parameters legal for the action, redirect tokens,
and last ``@default`` + ``allow`` without ``target=``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

from qubes_mcp.policy.errors import PolicySyntaxError
from qubes_mcp.policy.tokens import Context, Kind, Token, parse_token

#: Characters allowed in service names and arguments (QX ``RPCNAME_ALLOWED_CHARSET``).
RPCNAME_CHARSET = frozenset(string.ascii_letters + string.digits + "+-._")
_SERVICE_CHARSET = RPCNAME_CHARSET - {"+"}


@dataclass(frozen=True, slots=True)
class DenyAction:
    """``deny [notify=yes|no]``; notify defaults to yes."""

    notify: bool = True

    def __str__(self) -> str:
        return "deny" + ("" if self.notify else " notify=no")


@dataclass(frozen=True, slots=True)
class AllowAction:
    """``allow [target=T] [user=U] [notify=yes|no] [autostart=yes|no]``."""

    target: Token | None = None
    user: str | None = None
    notify: bool = False
    autostart: bool = True

    def __str__(self) -> str:
        return "allow" + _params(
            target=self.target, user=self.user, **_flags(self.notify, self.autostart)
        )


@dataclass(frozen=True, slots=True)
class AskAction:
    """``ask [target=T] [default_target=T] [user=U] [notify=yes|no] [autostart=yes|no]``."""

    target: Token | None = None
    default_target: Token | None = None
    user: str | None = None
    notify: bool = False
    autostart: bool = True

    def __str__(self) -> str:
        return "ask" + _params(
            target=self.target,
            default_target=self.default_target,
            user=self.user,
            **_flags(self.notify, self.autostart),
        )


Action = AllowAction | AskAction | DenyAction


def _params(**params: object) -> str:
    return "".join(f" {key}={value}" for key, value in params.items() if value)


def _flags(notify: bool, autostart: bool) -> dict[str, str]:
    # Only non-defaults are written, so a rule prints as qrexec prints it, yet re-parses
    # to the same rule (qrexec's own __str__ drops these two).
    return {"notify": "yes" if notify else "", "autostart": "" if autostart else "no"}


# Which keyword parameters each action takes; anything else is a syntax error.
_ACTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "allow": ("Allow", frozenset({"target", "user", "notify", "autostart"})),
    "deny": ("Deny", frozenset({"notify"})),
    "ask": ("Ask", frozenset({"target", "default_target", "user", "notify", "autostart"})),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """A parsed rule and where it came from.

    Attributes:
        service: The service name, or None for ``*``.
        argument: The argument including its ``+``, or None for ``*``.
        source: The source column.
        target: The target column.
        action: What to do on a match.
        filepath: The file the rule is written in.
        lineno: Its 1-based line number there.
    """

    service: str | None
    argument: str | None
    source: Token
    target: Token
    action: Action
    filepath: PurePath | str
    lineno: int

    def __str__(self) -> str:
        return "\t".join(
            (
                self.service or "*",
                self.argument or "*",
                self.source.text,
                self.target.text,
                str(self.action),
            )
        )


def _invalid_chars(text: str, allowed: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted({c for c in text if c not in allowed}))


def validate_service_and_argument(
    service: str, argument: str, *, filepath: PurePath | str | None, lineno: int | None
) -> tuple[str | None, str | None]:
    """Check the SERVICE and ARGUMENT columns; ``*`` becomes None.

    Raises:
        PolicySyntaxError: For characters outside the qrexec charset (``+`` is not allowed
            in a service), an argument that does not start with ``+``, or an argument with
            a ``*`` service.
    """
    service_: str | None = None if service == "*" else service
    if service_ is not None:
        bad = _invalid_chars(service_, _SERVICE_CHARSET)
        if bad:
            raise PolicySyntaxError(
                filepath, lineno, f"service {service_!r} contains invalid characters: {bad!r}"
            )
    argument_: str | None = None if argument == "*" else argument
    if argument_ is not None:
        bad = _invalid_chars(argument_, RPCNAME_CHARSET)
        if bad:
            raise PolicySyntaxError(
                filepath, lineno, f"argument {argument_!r} contains invalid characters: {bad!r}"
            )
        if not argument_.startswith("+"):
            raise PolicySyntaxError(
                filepath, lineno, f"argument {argument_!r} does not start with +"
            )
        if service_ is None:
            raise PolicySyntaxError(filepath, lineno, "only * argument allowed for * service")
    return service_, argument_


def _parse_action(
    action: str, params: Sequence[str], *, filepath: PurePath | str, lineno: int
) -> Action:
    if action not in _ACTIONS:
        raise PolicySyntaxError(filepath, lineno, f"invalid action: {action}")
    class_name, allowed = _ACTIONS[action]
    kwds: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep:
            raise PolicySyntaxError(filepath, lineno, f"invalid action parameter syntax: {param!r}")
        if key in kwds:
            raise PolicySyntaxError(filepath, lineno, f"parameter given twice: {key!r}")
        kwds[key] = value
    flags: dict[str, bool] = {}
    for key in ("notify", "autostart"):
        if key in kwds:
            if kwds[key] not in ("yes", "no"):
                raise PolicySyntaxError(
                    filepath,
                    lineno,
                    f"{key!r} is {kwds[key]!r}, but can be only 'yes' or 'no'",
                )
            flags[key] = kwds[key] == "yes"
    if not set(kwds) <= allowed:
        raise PolicySyntaxError(
            filepath, lineno, f"invalid parameters for action {class_name}: {list(params)}"
        )

    def redirect(key: str) -> Token | None:
        if key not in kwds:
            return None
        return parse_token(kwds[key], Context.REDIRECT, filepath=filepath, lineno=lineno)

    if action == "deny":
        return DenyAction(notify=flags.get("notify", True))
    if action == "allow":
        return AllowAction(
            target=redirect("target"),
            user=kwds.get("user"),
            notify=flags.get("notify", False),
            autostart=flags.get("autostart", True),
        )
    return AskAction(
        target=redirect("target"),
        default_target=redirect("default_target"),
        user=kwds.get("user"),
        notify=flags.get("notify", False),
        autostart=flags.get("autostart", True),
    )


def make_rule(
    service: str,
    argument: str,
    source: str,
    target: str,
    *,
    action: str,
    params: Sequence[str],
    filepath: PurePath | str,
    lineno: int,
) -> Rule:
    """Build a rule from its columns, with every check of qrexec's ``Rule.__init__``.

    Raises:
        PolicySyntaxError: Naming the file and line.
    """
    service_, argument_ = validate_service_and_argument(
        service, argument, filepath=filepath, lineno=lineno
    )
    source_ = parse_token(source, Context.SOURCE, filepath=filepath, lineno=lineno)
    target_ = parse_token(target, Context.TARGET, filepath=filepath, lineno=lineno)
    action_ = _parse_action(action, params, filepath=filepath, lineno=lineno)
    if target_.kind is Kind.DEFAULT and isinstance(action_, AllowAction) and action_.target is None:
        raise PolicySyntaxError(
            filepath, lineno, "allow action for @default rule must specify target= option"
        )
    return Rule(service_, argument_, source_, target_, action_, filepath, lineno)


def parse_rule(line: str, *, filepath: PurePath | str, lineno: int) -> Rule:
    """Parse one line of the current (5-column) syntax.

    Raises:
        PolicySyntaxError: Naming the file and line.
    """
    fields = line.split()
    if len(fields) < 5:
        raise PolicySyntaxError(filepath, lineno, "wrong number of fields")
    service, argument, source, target, action, *params = fields
    return make_rule(
        service,
        argument,
        source,
        target,
        action=action,
        params=params,
        filepath=filepath,
        lineno=lineno,
    )


def parse_service_rule(
    service: str, argument: str, line: str, *, filepath: PurePath | str, lineno: int
) -> Rule:
    """Parse one line of the old 3-column syntax used by ``!include-service`` files.

    ``line`` has already had its compatibility substitutions (``$`` → ``@``, ``,`` → space).

    Raises:
        PolicySyntaxError: Naming the file and line.
    """
    fields = line.split()
    action_and_params = [part for field in fields[2:] for part in field.split(",")]
    if len(fields) < 2 or not action_and_params:
        raise PolicySyntaxError(filepath, lineno, "wrong number of fields")
    source, target = fields[0], fields[1]
    action, *params = action_and_params
    return make_rule(
        service,
        argument,
        source,
        target,
        action=action,
        params=params,
        filepath=filepath,
        lineno=lineno,
    )
