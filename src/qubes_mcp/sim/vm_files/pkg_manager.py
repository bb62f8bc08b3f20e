"""``apt-get`` and ``dnf`` inside an emulated qube: an update that goes out the Qubes way and
finds nothing to change.

A Qubes template has no network of its own: its package manager talks to a local proxy
(``qubes-updates-proxy-forwarder`` on 127.0.0.1:8082) that carries each connection over
``qrexec-client-vm @default qubes.UpdatesProxy``, which dom0's policy sends to the update
qube (for qubes-mcp: the scope's egress qube, ``render.py``). This stand-in makes exactly
that call for the metadata refresh (``apt-get update``, ``dnf … --refresh``, ``dnf
makecache``), so whether an emulated template can reach its mirrors is decided by the same
policy as on Qubes; the emulated proxy (``rpc/qubes.UpdatesProxy``) answers that nothing is
newer, so an upgrade changes no package. Refused, it fails as apt and dnf do when their proxy
cannot be reached (exit 100 and 1). Everything else is answered as "nothing to do".
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

CLIENT = "/run/qubes-sim/lib/qubes_mcp/sim/vm_files/bin/qrexec-client-vm"
MIRROR = {"apt-get": "deb.debian.org", "dnf": "mirrors.fedoraproject.org"}


def _refresh(host: str) -> bool:
    """One metadata request through qubes.UpdatesProxy; True when the proxy answered."""
    request = f"HEAD http://{host}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    try:
        reply = subprocess.run(
            [CLIENT, "@default", "qubes.UpdatesProxy"],
            input=request.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return reply.returncode == 0 and reply.stdout.startswith(b"HTTP/1.1 ")


def apt_get(args: list[str]) -> int:
    words = [a for a in args if not a.startswith("-")]
    if words[:1] == ["update"]:
        host = MIRROR["apt-get"]
        if not _refresh(host):
            print(f"Err:1 http://{host}/debian stable InRelease", flush=True)
            print("  Could not connect to 127.0.0.1:8082 (127.0.0.1). - connect (111)")
            print("E: Some index files failed to download.", file=sys.stderr)
            return 100
        print(f"Hit:1 http://{host}/debian stable InRelease")
        print("Reading package lists... Done")
        return 0
    if words[:1] in (["upgrade"], ["dist-upgrade"], ["full-upgrade"]):
        print("Reading package lists... Done\nBuilding dependency tree... Done")
        print("Calculating upgrade... Done")
        print("0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.")
        return 0
    print(f"E: the emulated apt-get does not do {' '.join(words) or 'that'}", file=sys.stderr)
    return 100


def dnf(args: list[str]) -> int:
    words = [a for a in args if not a.startswith("-")]
    if ("--refresh" in args or words[:1] == ["makecache"]) and not _refresh(MIRROR["dnf"]):
        print("Error: Failed to download metadata for repo 'fedora'", file=sys.stderr)
        return 1
    if words[:1] in (["upgrade"], ["update"], ["makecache"]):
        print("Dependencies resolved.\nNothing to do.\nComplete!")
        return 0
    print(f"Error: the emulated dnf does not do {' '.join(words) or 'that'}", file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    name = os.path.basename(argv[0])
    return (dnf if name == "dnf" else apt_get)(list(argv[1:]))
