"""``qubes.UpdatesProxy`` in an emulated qube: the update proxy's far end.

On Qubes the service connects the caller to the proxy the qube runs when its
``qubes-updates-proxy`` service is on (tinyproxy on 127.0.0.1:8082) and so to the network.
Emulated qubes have no network: this answers every request with ``304 Not Modified`` (the
mirror has nothing newer than what the caller has), so an emulated update succeeds and changes
nothing (``pkg_manager.py``).
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        head += chunk
    sys.stdout.buffer.write(b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n")
    sys.stdout.buffer.flush()
    return 0
