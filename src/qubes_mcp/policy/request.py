"""The request side of a decision: normalising the intended target, checking the caller.

QX ``Request.__init__`` and ``IntendedTarget.verify`` (reference §5.5, step 3).
"""

from __future__ import annotations

from qubes_mcp.policy.errors import AccessDenied, PolicySyntaxError
from qubes_mcp.policy.sysinfo import RUNNING, SystemInfo
from qubes_mcp.policy.tokens import Context, Kind, is_dom0, parse_token


def normalize_target(target: str, system_info: SystemInfo) -> tuple[str, Kind]:
    """The intended target as policy sees it (QX ``IntendedTarget.verify``).

    Args:
        target: The target as the caller wrote it (after qrexec's own sanitising).
        system_info: The fleet.

    Returns:
        The normalised target and its kind (NAME, ADMINVM, DEFAULT, DISPVM or
        DISPVM_TEMPLATE).

    Raises:
        AccessDenied: For a keyword that cannot be a request target, or ``@dispvm:Q``
            where Q is not a disposable template.
    """
    if target == "":
        return "@default", Kind.DEFAULT
    try:
        token = parse_token(target, Context.INTENDED)
    except PolicySyntaxError as err:
        raise AccessDenied(f"invalid target {target!r}: {err.msg}") from err
    if token.kind is Kind.NAME and target not in system_info:
        return "@default", Kind.DEFAULT
    if token.kind is Kind.DISPVM_TEMPLATE:
        domain = system_info.get(token.value)
        if domain is None or not domain.template_for_dispvms:
            raise AccessDenied(f"not a template for dispvm: {token.value}")
    return token.text, token.kind


def allow_without_autostart(target: str, system_info: SystemInfo) -> bool:
    if is_dom0(target):
        return True
    if target.startswith("@dispvm"):
        return False
    domain = system_info.get(target)
    if domain is None:
        # qrexec asserts here; its daemon answers that with a refusal.
        raise AccessDenied(f"target {target!r} does not exist")
    return domain.power_state == RUNNING


def check_argument(argument: str) -> None:
    if not argument.startswith("+"):
        raise AccessDenied(f"invalid argument {argument!r}: must start with +")


def check_request(argument: str, source: str, system_info: SystemInfo) -> None:
    check_argument(argument)
    if source not in system_info:
        # qrexec-daemon only ever passes a running qube's name; anything else is refused.
        raise AccessDenied(f"unknown source {source!r}")


def relayed_source(relay: str, requested_source: str, system_info: SystemInfo) -> str:
    """Check a Qubes Air relayed call (QX ``Request.__init__``); return the new source."""
    domain = system_info.get(requested_source)
    if domain is None:
        raise AccessDenied(f"unknown requested source qube {requested_source!r}")
    if domain.klass != "RemoteVM":
        raise AccessDenied(f"{requested_source}: requested source is only authorized for RemoteVM")
    if domain.relayvm != relay:
        raise AccessDenied(f"{relay} is not a relay for {requested_source}")
    return requested_source
