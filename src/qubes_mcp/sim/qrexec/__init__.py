"""The emulated qrexec: a router that evaluates policy and dispatches calls to dom0 services
and to sandboxed qubes, and the clients that talk to it.

Modules: ``wire`` (the router's framed byte protocol, shared with the in-qube shims),
``qubesd_client`` (the router's only way to reach qubesd: its sockets), ``router``
(``start_router``), ``client`` (``call``, ``sim_call_main``), ``dom0_rpc`` (the dom0 service
directory, ``install_dom0_rpc``), ``default_policy`` (``install_default_policy``),
``operator`` (who answers ``ask``), ``policy_cache``.

The names below are loaded lazily: the in-qube shims import ``qubes_mcp.sim.qrexec.wire``
inside a sandbox, and importing this package must not pull in the router there.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing is not imported at run time: per-call clients import this
if TYPE_CHECKING:
    from typing import Any

_EXPORTS = {
    "Router": "router",
    "RouterConfig": "config",
    "start_router": "router",
    "CallResult": "client",
    "RouterUnavailableError": "client",
    "call": "client",
    "sim_call_main": "client",
    "install_dom0_rpc": "dom0_rpc",
    "install_default_policy": "default_policy",
    "AskOperator": "operator",
    "DenyAllOperator": "operator",
    "ScriptedOperator": "operator",
    "QubesdClient": "qubesd_client",
}

__all__ = [
    "AskOperator",
    "CallResult",
    "DenyAllOperator",
    "QubesdClient",
    "Router",
    "RouterConfig",
    "RouterUnavailableError",
    "ScriptedOperator",
    "call",
    "install_default_policy",
    "install_dom0_rpc",
    "sim_call_main",
    "start_router",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
