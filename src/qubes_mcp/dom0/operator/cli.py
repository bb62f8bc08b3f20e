"""``qubes-mcp-admin``: the operator's dom0 tool (policy commands here; the gate's in cli_gate.py).

Each subcommand group registers itself on the top-level parser (``_register_policy``); a new
group adds one ``_register_*`` function and one line in :func:`build_parser`.

``policy eval`` answers exactly like the qrexec policy daemon (``key=value`` lines on stdout,
``result=deny`` for every refusal) and exits 0 whatever the verdict; the reason for a refusal
goes to stderr, as the daemon writes it to its log. Exit 2 means the question itself was
unusable (bad arguments, unreadable system info).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qubes_mcp.policy import (
    AccessDenied,
    AllowResolution,
    Policy,
    PolicyError,
    SystemInfo,
    SystemInfoError,
)
from qubes_mcp.policy.loader import lint_dirs

#: qrexec's policy directories, runtime first so that its files win (QX ``qrexec/__init__.py``).
DEFAULT_POLICY_DIRS = (Path("/run/qubes/policy.d"), Path("/etc/qubes/policy.d"))
#: Cap on the system information file; a real fleet's JSON is a few hundred KiB.
MAX_SYSTEM_INFO_BYTES = 16 * 1024 * 1024

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line or an input file is unusable; exit 2."""


def _read_system_info(path: Path) -> SystemInfo:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SYSTEM_INFO_BYTES + 1)
    except OSError as err:
        raise UsageError(f"cannot read system info {path}: {err.strerror}") from err
    if len(data) > MAX_SYSTEM_INFO_BYTES:
        raise UsageError(f"system info {path} is larger than {MAX_SYSTEM_INFO_BYTES} bytes")
    try:
        return SystemInfo.from_json(json.loads(data))
    except (ValueError, SystemInfoError) as err:
        raise UsageError(f"invalid system info {path}: {err}") from err


def split_service(service_and_arg: str) -> tuple[str, str]:
    """``SERVICE+ARG`` → (``SERVICE``, ``+ARG``); no ``+`` means the empty argument ``+``.

    Raises:
        UsageError: For an empty service name (qrexec-daemon refuses those too).
    """
    service, plus, arg = service_and_arg.partition("+")
    if not service:
        raise UsageError(f"invalid service {service_and_arg!r}: empty service name")
    return service, "+" + arg if plus else "+"


def answer(
    policy: Policy,
    *,
    source: str,
    target: str,
    service_and_arg: str,
    system_info: SystemInfo,
    just_evaluate: bool = False,
    assume_yes_for_ask: bool = False,
    log: TextIO | None = None,
) -> list[str]:
    """The policy daemon's answer lines for one request (QX ``handle_request``).

    Args:
        policy: The loaded policy.
        source: The calling qube.
        target: The target as the caller wrote it.
        service_and_arg: ``SERVICE[+ARG]``.
        system_info: The fleet.
        just_evaluate: Answer only ``result=allow``/``result=deny`` (``policy.EvalSimple``).
        assume_yes_for_ask: Treat ``ask`` as the user allowing the requested target.
        log: Where to write the reason for a refusal.

    Returns:
        The answer lines; a refusal is ``["result=deny"]``.
    """
    service, argument = split_service(service_and_arg)
    try:
        resolution = policy.evaluate(
            service=service,
            argument=argument,
            source=source,
            target=target,
            system_info=system_info,
        )
        if not isinstance(resolution, AllowResolution):
            if not assume_yes_for_ask:
                raise AccessDenied("denied for non-interactive ask")
            resolution = resolution.allow(resolution.requested_target)
        if just_evaluate:
            return ["result=allow"]
        return resolution.daemon_lines(system_info)
    except PolicyError as err:
        if log is not None:
            print(f"qrexec: {service}{argument}: {source} -> {target}: denied: {err}", file=log)
        return ["result=deny"]


def _policy_eval(args: argparse.Namespace) -> int:
    dirs = args.dir or list(DEFAULT_POLICY_DIRS)
    system_info = _read_system_info(args.system_info)
    split_service(args.service)
    try:
        policy = Policy.load(dirs)
    except PolicyError as err:
        # The daemon cannot load the policy: every call is refused.
        print(f"error loading policy: {err}", file=sys.stderr)
        print("result=deny")
        return EXIT_OK
    lines = answer(
        policy,
        source=args.source,
        target=args.target,
        service_and_arg=args.service,
        system_info=system_info,
        just_evaluate=args.just_evaluate,
        assume_yes_for_ask=args.assume_yes_for_ask,
        log=sys.stderr,
    )
    print("\n".join(lines))
    return EXIT_OK


def _policy_lint(args: argparse.Namespace) -> int:
    dirs = args.dir or list(DEFAULT_POLICY_DIRS)
    rules, files, errors = lint_dirs(dirs)
    if errors:
        for err in errors:
            print(err)
        return EXIT_PROBLEMS
    print(f"ok: {len(rules)} rules in {len(set(files))} files")
    return EXIT_OK


def _register_policy(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    policy = sub.add_parser("policy", help="evaluate and check qrexec policy")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    dir_help = "a policy directory; repeat, earlier ones win (default: qrexec's two)"

    ev = psub.add_parser(
        "eval",
        help="decide one call as the qrexec policy daemon does",
        description="Print the policy daemon's key=value answer; exit 0 whatever the verdict.",
    )
    ev.add_argument("--dir", type=Path, action="append", help=dir_help)
    ev.add_argument(
        "--system-info",
        type=Path,
        required=True,
        help="internal.GetSystemInfo JSON ({'domains': {...}})",
    )
    ev.add_argument("--just-evaluate", action="store_true", help="answer only result=allow|deny")
    ev.add_argument(
        "--assume-yes-for-ask",
        action="store_true",
        help="treat ask as allowed to the requested target",
    )
    ev.add_argument("source", help="the calling qube")
    ev.add_argument("target", help="the target as the caller wrote it ('' means @default)")
    ev.add_argument("service", metavar="SERVICE[+ARG]", help="service and argument")
    ev.set_defaults(func=_policy_eval)

    lint = psub.add_parser(
        "lint",
        help="check that a policy loads; list every problem",
        description="Exit 0 with a summary, or 1 with FILE:LINE: message for every problem.",
    )
    lint.add_argument("--dir", type=Path, action="append", help=dir_help)
    lint.set_defaults(func=_policy_lint)
    return psub


def project_version() -> str:
    """The project's one version string, ``__version__`` in the package root's ``__init__.py``
    (installed with every dom0 bundle and RPM). Read, not imported: dom0 code imports nothing
    outside ``dom0/`` and ``policy/``."""
    root = Path(__file__).resolve().parents[2] / "__init__.py"
    for node in ast.parse(root.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``qubes-mcp-admin`` argument parser with every subcommand group."""
    parser = argparse.ArgumentParser(
        prog="qubes-mcp-admin", description="qubes-mcp operator tool (runs in dom0)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    psub = _register_policy(sub)
    from qubes_mcp.dom0.operator import cli_gate, plan_cli

    cli_gate.register(sub, psub)
    plan_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qubes-mcp-admin``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except UsageError as err:
        print(f"qubes-mcp-admin: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return status


if __name__ == "__main__":
    sys.exit(main())
