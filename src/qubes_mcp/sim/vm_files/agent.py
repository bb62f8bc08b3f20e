"""The in-sandbox stand-in for ``qrexec-agent``: every sandboxed command starts here.

``python -m qubes_mcp.sim.vm_files.agent service SERVICE+ARG`` runs a qube-side qrexec
service; ``… agent exec PROGRAM [ARGS…]`` runs a plain command. Either way the agent first
drops the ``PYTHONPATH`` it was started with, makes sure the home directory exists and changes
into it, as qrexec's login-shell wrapper does.

Service lookup (QX ``libqrexec/exec.c`` order): ``/usr/local/etc/qubes-rpc`` — here the qube's
own ``/rw/usrlocal/etc/qubes-rpc`` — before the template's ``/etc/qubes-rpc`` (here the
services shipped in ``vm_files/rpc``); ``SERVICE+ARG`` is looked for in every directory before
``SERVICE``. A missing
service exits 127. Only regular executable files are services here (no socket services in
emulated qubes).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence

USER_RPC_DIR = "/rw/usrlocal/etc/qubes-rpc"
TEMPLATE_RPC_DIR = "/run/qubes-sim/lib/qubes_mcp/sim/vm_files/rpc"
NAME_MAX = 255
EXIT_NOT_FOUND = 127


def find_service(service_and_arg: str) -> str | None:
    """Path of the executable for ``service+arg``, or ``None``."""
    service, _, _arg = service_and_arg.partition("+")
    if not service or len(service) > NAME_MAX or service in {".", ".."} or "/" in service_and_arg:
        return None
    for name in (service_and_arg, service):  # SERVICE+ARG in every directory first
        for directory in (USER_RPC_DIR, TEMPLATE_RPC_DIR):
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
                return path
    return None


def _enter_home() -> None:
    home = os.environ.get("HOME", "/")
    # Like the first boot of a real qube (mount-dirs): /home/user lives on the private
    # volume and exists whoever runs first, so root's commands may write to it too.
    os.makedirs("/rw/home/user", mode=0o755, exist_ok=True)
    if home != "/home/user":
        os.makedirs(home, mode=0o700, exist_ok=True)
    os.chdir(home)
    os.environ["PWD"] = home  # /home/user is a symlink here; shells keep the logical path


def main(argv: Sequence[str]) -> int:
    os.environ.pop("PYTHONPATH", None)
    if len(argv) < 2 or argv[0] not in {"service", "exec"}:
        print("usage: agent service SERVICE+ARG | agent exec PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    try:
        _enter_home()
    except OSError as exc:
        print(f"qrexec-agent: cannot enter home directory: {exc}", file=sys.stderr)
        return 1
    if argv[0] == "exec":
        try:
            os.execvp(argv[1], list(argv[1:]))  # noqa: S606 - exec is the service
        except OSError as exc:
            print(f"{argv[1]}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_FOUND
    service_and_arg = argv[1]
    path = find_service(service_and_arg)
    if path is None:
        print(f"qrexec-agent: service {service_and_arg!r} not found", file=sys.stderr)
        return EXIT_NOT_FOUND
    _service, _, arg = service_and_arg.partition("+")
    os.environ["QREXEC_AGENT_PID"] = str(os.getpid())
    try:
        os.execv(path, [path, arg] if arg else [path])  # noqa: S606 - exec is the service
    except OSError as exc:
        print(f"qrexec-agent: cannot execute {path}: {exc.strerror}", file=sys.stderr)
    return EXIT_NOT_FOUND


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
