"""Lab links between two qubes of a scope (decision record 0018): open, list, close.

A link lets a *client* qube reach one TCP port of a *server* qube, the way Qubes does it:

* policy: one line ``qubes.ConnectTCP +PORT CLIENT SERVER allow``, rendered from the link kept
  in dom0's registry (``enrolment.Registry.links``) and written with it in one commit, so the
  registry and the policy agree after a crash (``enrolment.commit``);
* server: the stock ``qubes.ConnectTCP`` service (qubes-core-agent; qrexec connects the call
  to ``127.0.0.1:PORT`` in the server) -- nothing to set up there;
* client: ``qvm-connect-tcp PORT:SERVER:PORT`` (qubes-core-agent), run by the gate through its
  own line into the client (``relay.py``, as for ``qube.run``): a listener on the client's
  ``PORT`` that runs ``qrexec-client-vm SERVER qubes.ConnectTCP+PORT`` for each connection.

The listener and everything it forks carry ``QMCP_LINK=<link id>`` in their environment, so
closing the link kills exactly them (``relay.kill_script``), and opening a link kills every
listener of the client whose link is no longer open (a qube removed, a link closed while the
client was down), so a stale listener never holds a port. The policy line is what gives the
capability: it goes first on close and last on open, and a listener without it only ever
gets "Request refused".
"""

from __future__ import annotations

import logging
from typing import Any

from qubes_mcp.dom0.config import Principal
from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.enrolment import (
    Link,
    Registry,
    commit_change,
    new_link,
)
from qubes_mcp.dom0.errors import ConflictError, FailedError, GateError, InvalidStateError
from qubes_mcp.dom0.handlers_write import relay
from qubes_mcp.dom0.relay import kill_script, run_command

log = logging.getLogger("qubes_mcp.gate")

#: the environment variable that marks a link's listener (and its children) in the client
LINK_MARKER = "QMCP_LINK"
#: Runs in the client as root: ``sh -c LISTEN qmcp-link ID PORT:SERVER:PORT KEEP...``. Kills
#: every marked listener whose id is not in KEEP (the client's other open links; the link's
#: own old listener too, so opening again rebinds), then starts the listener marked with ID.
#: Its output goes nowhere, so the call ends when ``qvm-connect-tcp`` has started it.
LISTEN_SCRIPT = (
    'id=$1; spec=$2; shift 2; keep=" $* "; '
    "for d in /proc/[0-9]*; do "
    f"m=$(tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | sed -n 's/^{LINK_MARKER}=//p'); "
    '[ -n "$m" ] || continue; '
    'case "$keep" in *" $m "*) continue;; esac; '
    'kill -KILL "${d#/proc/}" 2>/dev/null; '
    "done; "
    f"{LINK_MARKER}=$id; export {LINK_MARKER}; "
    'exec qvm-connect-tcp "$spec" </dev/null >/dev/null 2>&1'
)
#: how long starting or stopping a listener may take in the client
LISTENER_TIMEOUT = 30


def _view(link: Link) -> dict[str, Any]:
    return {"id": link.id, "client": link.client, "server": link.server, "port": link.port}


def check_open(
    registry: Registry, principal: Principal, client: str, server: str, port: int
) -> Link | None:
    """The link ``link.open`` would open again (``None`` for a new one), or ``conflict``:
    the client's port already leads to another server, or another principal holds the link.
    The gate asks this before the operator is asked, and again under the registry's lock."""
    scope, by = principal.scope.prefix, principal.scope.born_by(principal.qube)
    for other in registry.links(scope):
        if other.client == client and other.port == port and other.server != server:
            raise ConflictError(
                f"port {port} of {client} is already linked to another qube; close it first",
                reason="client port already linked",
            )
    found = registry.link(scope, client, server, port)
    if found is not None and found.by != by:
        raise ConflictError(
            "another principal opened this link", reason="link opened by another principal"
        )
    return found


async def link_open(ctx: Context) -> dict[str, Any]:
    """Record the link and its policy line, then start the listener in the client.

    Opening a link that is open already (same client, server and port) keeps its id and
    starts its listener again (after the client restarted, say). If the listener cannot be
    started, the link is closed again (``rolled_back``) and the request fails.
    """
    client, server, port = ctx.target, ctx.args["server"], ctx.args["port"]
    scope, by = ctx.principal.scope.prefix, ctx.principal.scope.born_by(ctx.principal.qube)
    ctx.detail.update(source=client, dest=server, port=port)
    opened: list[Link] = []

    def change(registry: Registry) -> Registry:
        found = check_open(registry, ctx.principal, client, server, port)
        link = found or new_link(scope, client, server, port, by=by)
        opened.append(link)
        try:
            return registry.linked(link)
        except ValueError:
            raise FailedError(reason="link ends are not registered members") from None

    after = await commit_change(ctx.config, change)
    link = opened[-1]
    ctx.detail["link_id"] = link.id
    keep = [k.id for k in after.links(scope) if k.client == client and k.id != link.id]
    try:
        result = await relay(
            ctx,
            client,
            ["sh", "-c", LISTEN_SCRIPT, "qmcp-link", link.id, f"{port}:{server}:{port}", *keep],
            b"",
            LISTENER_TIMEOUT,
        )
        started = result.exit_code == 0
    except GateError:
        started = False
    if not started:
        try:
            await commit_change(ctx.config, lambda r: r.unlinked(link.id))
            ctx.detail["rolled_back"] = True
        except GateError as exc:  # the line stays: still consented, and link.close removes it
            log.warning("qubes-mcp gate: link %s not rolled back: %s", link.id, exc.reason)
        raise FailedError(
            f"the listener for port {port} could not start in {client} (port in use?)",
            reason="link listener did not start",
        )
    return {"link": _view(link), "listening": f"localhost:{port} in {client}"}


async def link_close(ctx: Context) -> dict[str, Any]:
    """Remove the link's policy line (the capability) at once, then stop its listener in the
    client if it runs (best effort: without the line, the listener only meets refusals)."""
    client, server, port = ctx.target, ctx.args["server"], ctx.args["port"]
    scope, by = ctx.principal.scope.prefix, ctx.principal.scope.born_by(ctx.principal.qube)
    ctx.detail.update(source=client, dest=server, port=port)
    closed: list[Link] = []

    def change(registry: Registry) -> Registry:
        found = registry.link(scope, client, server, port)
        if found is None or found.by != by:
            raise InvalidStateError("no such link is open", reason="no such link")
        closed.append(found)
        return registry.unlinked(found.id)

    await commit_change(ctx.config, change)
    link = closed[-1]
    ctx.detail["link_id"] = link.id
    q = ctx.facts.get(client)
    stopped = False
    if q is not None and q.state == "Running":  # a halted client has no listener left
        stopped = await stop_listeners(ctx, client, [link.id])
    return {"closed": _view(link), "listener_stopped": stopped}


async def stop_listeners(ctx: Context, client: str, ids: list[str]) -> bool:
    """Kill the listeners of links ``ids`` in ``client`` (never starts it); True if it
    answered. Never raises."""
    argv = ["sh", "-c", kill_script(LINK_MARKER), "qmcp-unlink", *ids]
    try:
        result = await run_command(
            ctx.config.paths.qrexec_client,
            client,
            argv,
            stdin=b"",
            timeout=LISTENER_TIMEOUT,
            limit=4096,
        )
    except OSError:
        return False
    return result.exit_code == 0


async def link_list(ctx: Context) -> dict[str, Any]:
    """The links this principal opened whose both qubes are in its scope now (read fresh:
    a link never names a qube the caller cannot see)."""
    registry = ctx.reader.refresh()
    by = ctx.principal.scope.born_by(ctx.principal.qube)
    seen: dict[str, bool] = {}
    out = []
    for link in registry.links(ctx.principal.scope.prefix):
        if link.by != by:
            continue
        for name in (link.client, link.server):
            if name not in seen:
                seen[name] = await ctx.in_scope(name)
        if seen[link.client] and seen[link.server]:
            out.append({**_view(link), "opened_at": link.at})
    return {"links": out}


__all__ = [
    "LINK_MARKER",
    "LISTEN_SCRIPT",
    "check_open",
    "link_close",
    "link_list",
    "link_open",
    "stop_listeners",
]
