"""The emulated qrexec daemon: one router for the whole emulated machine.

It listens on ``router_sock`` (dom0-side tools name their source) and on one agent socket per
running qube (the source is the socket's qube, whatever the request says). For each call it
does what qrexec-daemon and the policy daemon do (qubes-internals §5.5–5.9):

1. sanitise the request (bytes outside the allowed charsets become ``_``; an empty service or
   one starting with ``+`` is refused; length limits of §5.8);
2. evaluate the policy (reloaded when its files change) against fresh
   ``internal.GetSystemInfo``; ``ask`` goes to the :class:`~.operator.AskOperator`;
3. dispatch: a dom0 service (socket or executable, §1.7, §5.9), a qube's service through
   that qube's agent (``ROOT/run/qubes/qrexec.NAME``, the long-lived sandbox's qrexec agent of
   :mod:`qubes_mcp.sim.machine`; the qube is started first when ``autostart`` allows), or a
   new disposable that is killed when the call ends.

Every failure before dispatch is a refusal (``REFUSED``: the caller prints ``Request refused``
and exits 126); nothing a caller sends can stop the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from qubes_mcp.sim.paths import SimPaths
from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.qrexec.config import RouterConfig
from qubes_mcp.sim.qrexec.dom0_rpc import find_dom0_service
from qubes_mcp.sim.qrexec.operator import AskOperator, DenyAllOperator
from qubes_mcp.sim.qrexec.policy_cache import PolicyCache
from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient, QubesdError, QubesdUnavailableError
from qubes_mcp.sim.qrexec.request import CallRequest, RefusedError, sanitise_request
from qubes_mcp.sim.qrexec.streams import stream_agent, stream_process, stream_socket
from qubes_mcp.sim.sandbox import USERS

log = logging.getLogger("qubes_mcp.sim.qrexec")

#: Host environment a dom0 service inherits (the rest of the router's environment is not its
#: business); QREXEC_* and QUBES_SIM_ROOT are added per call.
_DOM0_ENV_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TMPDIR")


class Router:
    """The running router; create it with :func:`start_router`."""

    def __init__(
        self,
        paths: SimPaths,
        operator: AskOperator | None = None,
        *,
        config: RouterConfig | None = None,
        qubesd: QubesdClient | None = None,
    ) -> None:
        self.paths = paths
        self.operator: AskOperator = operator or DenyAllOperator()
        self.config = config or RouterConfig()
        self.qubesd = qubesd or QubesdClient(paths)
        self.policy = PolicyCache(paths.policy_dirs)
        self._control: asyncio.AbstractServer | None = None
        self._direct: asyncio.AbstractServer | None = None
        self._agents: dict[str, asyncio.AbstractServer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_task: asyncio.Task[None] | None = None
        self._closing = False
        self._agent_lock = asyncio.Lock()  # one listener per qube even under concurrent calls
        self._in_flight: dict[str, int] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        sock_dir = self.paths.vm_agent_sock("x").parent
        sock_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.paths.router_sock.parent, 0o700)  # host-side tools only
        self._control = await self._listen(self.paths.router_sock, None)
        self._direct = await self._listen(self.paths.dom0_direct_sock, None, direct=True)
        self._events_task = asyncio.create_task(self._follow_events())
        with contextlib.suppress(QubesdUnavailableError, QubesdError):
            await self._resync()

    async def _resync(self) -> None:
        """Agent sockets for exactly the running qubes (at start, and whenever the event
        stream (re)connects, since events may have been missed meanwhile)."""
        info = await self.qubesd.system_info()
        running = {
            str(name)
            for name, dom in info["domains"].items()
            if name != "dom0" and isinstance(dom, dict) and dom.get("power_state") == "Running"
        }
        for name in running:
            await self.ensure_agent(name)
        for name in set(self._agents) - running:
            await self.drop_agent(name)

    async def close(self) -> None:
        """Stop listening and remove the sockets (the qubes' sandboxes are the hypervisor's)."""
        self._closing = True
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._events_task
        for name in list(self._agents):
            await self.drop_agent(name)
        for server, path in (
            (self._control, self.paths.router_sock),
            (self._direct, self.paths.dom0_direct_sock),
        ):
            if server is not None:
                server.close()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        # Cancel the calls in flight before waiting for the server: since Python 3.12
        # wait_closed() also waits for every open connection.
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for server in (self._control, self._direct):
            if server is not None:
                await server.wait_closed()

    async def _listen(
        self, path: Path, vm_source: str | None, *, direct: bool = False
    ) -> asyncio.AbstractServer:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                if direct:
                    await self._serve_direct(reader, writer)
                else:
                    await self._serve_connection(reader, writer, vm_source)
            finally:
                self._tasks.discard(task)

        server = await asyncio.start_unix_server(handler, path=str(path))
        os.chmod(path, 0o600)
        return server

    async def ensure_agent(self, name: str) -> None:
        """The qube's socket for calls out of it, listening."""
        async with self._agent_lock:
            if name not in self._agents and not self._closing:
                self.paths.vm_router_dir(name).mkdir(parents=True, exist_ok=True)
                self._agents[name] = await self._listen(self.paths.vm_agent_sock(name), name)

    async def drop_agent(self, name: str) -> None:
        """The qube stopped: close and remove its socket for calls out of it."""
        server = self._agents.pop(name, None)
        if server is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths.vm_agent_sock(name).unlink()

    async def _follow_events(self) -> None:
        while not self._closing:
            try:
                async for event in self.qubesd.events():
                    if event.name == "connection-established":
                        await self._resync()
                    elif event.name == "domain-start" and event.subject:
                        await self.ensure_agent(event.subject)
                    elif event.name in {"domain-shutdown", "domain-stopped"} and event.subject:
                        await self.drop_agent(event.subject)
                    elif event.name == "domain-delete":
                        await self.drop_agent(event.kwargs.get("vm", event.subject))
            except (QubesdUnavailableError, QubesdError, OSError) as exc:
                log.debug("event stream unavailable: %s", exc)
            # qubesd restarted or not up yet: reconnect (a daemon's retry, not a test wait)
            await asyncio.sleep(0.5)

    # --- one connection -----------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, vm_source: str | None
    ) -> None:
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), self.config.request_timeout)
            if frame is None or frame[0] != wire.REQUEST:
                raise wire.WireError("first frame must be REQUEST")
            request = sanitise_request(wire.parse_request(frame[1]), vm_source)
            if self._in_flight.get(request.source, 0) >= self.config.max_calls_per_source:
                raise RefusedError(f"too many concurrent calls from {request.source!r}")
            self._in_flight[request.source] = self._in_flight.get(request.source, 0) + 1
            try:
                await self._route(request, reader, writer)
            finally:
                self._in_flight[request.source] -= 1
        except (wire.WireError, RefusedError, TimeoutError, UnicodeError) as exc:
            log.info("qrexec request refused: %s", exc)
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(wire.encode_frame(wire.REFUSED))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("qrexec call failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_direct(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """dom0 runs a service in a qube with no policy evaluation, as ``qrexec-client -d``
        does for ``qvm-run`` in a real dom0. The request's source field names the user."""
        try:
            frame = await asyncio.wait_for(wire.read_frame(reader), self.config.request_timeout)
            if frame is None or frame[0] != wire.REQUEST:
                raise wire.WireError("first frame must be REQUEST")
            untrusted = wire.parse_request(frame[1])
            user = untrusted.untrusted_source.decode("ascii", errors="replace")
            request = sanitise_request(
                wire.UntrustedRequest(
                    untrusted.untrusted_target, untrusted.untrusted_service, b"dom0"
                ),
                None,
            )
            info = await self.qubesd.system_info()
            name = _domain_name(info, request.target)
            if name is None or name == "dom0":
                raise RefusedError(f"no qube {request.target!r} to run in")
            if info["domains"][name].get("power_state") != "Running":
                try:
                    await self.qubesd.start(name)
                except (QubesdError, QubesdUnavailableError) as exc:
                    raise RefusedError(f"cannot start {name!r}: {exc}") from None
            await self._call_vm(request, name, user, reader, writer)
        except (
            wire.WireError,
            RefusedError,
            TimeoutError,
            UnicodeError,
            QubesdError,
            QubesdUnavailableError,
        ) as exc:
            log.info("dom0 direct call refused: %s", exc)
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(wire.encode_frame(wire.REFUSED))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _decide(self, request: CallRequest) -> tuple[Any, dict[str, Any]]:
        """Policy verdict as an AllowResolution, plus the system info it was made on."""
        try:
            info = await self.qubesd.system_info()
        except (QubesdUnavailableError, QubesdError) as exc:
            raise RefusedError(f"no system info: {exc}") from None
        if request.source not in info["domains"]:
            raise RefusedError(f"unknown source {request.source!r}")
        from qubes_mcp.policy import AccessDenied, AskResolution, PolicyError, SystemInfo

        policy = self.policy.get()
        if policy is None:
            raise RefusedError("policy failed to load: denying everything")
        try:
            system_info = SystemInfo.from_json(info)
            resolution = policy.evaluate(
                service=request.service,
                argument=f"+{request.arg}",
                source=request.source,
                target=request.target,
                system_info=system_info,
            )
            if isinstance(resolution, AskResolution):
                chosen = await asyncio.to_thread(
                    self.operator.ask,
                    request.source,
                    request.service_and_arg,
                    tuple(resolution.targets_for_ask),
                    resolution.default_target,
                )
                if chosen is None:
                    raise RefusedError("operator denied the ask")
                resolution = resolution.allow(chosen)
            # The daemon's last checks (loopback, target lookup) happen where it renders its
            # answer; a qube that is not a local one (Qubes Air RemoteVM) is not emulated.
            lines = resolution.daemon_lines(system_info)
            if any(line.startswith("service=") for line in lines):
                raise RefusedError("calls to remote qubes are not emulated")
        except (AccessDenied, PolicyError) as exc:
            if getattr(exc, "notify", False):  # notify=yes: the GUI would show a notification
                log.warning(
                    "qrexec denied %s -> %s %s",
                    request.source,
                    request.target,
                    request.service_and_arg,
                )
            raise RefusedError(f"policy: {exc}") from None
        return resolution, info

    async def _route(
        self, request: CallRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        resolution, info = await self._decide(request)
        target: str = resolution.target
        user = resolution.user if resolution.user not in (None, "DEFAULT") else "user"
        log.log(
            logging.WARNING if resolution.notify else logging.INFO,
            "qrexec %s -> %s %s: allowed to %s",
            request.source,
            request.target,
            request.service_and_arg,
            target,
        )
        if target.startswith("@dispvm:"):
            await self._call_dispvm(request, target[len("@dispvm:") :], user, reader, writer)
            return
        # dom0 may be spelled by name or by its uuid: either way it is the host, never a sandbox
        name = "dom0" if target == "dom0" else _domain_name(info, target)
        if name == "dom0":
            await self._call_dom0(request, resolution.requested_target, reader, writer)
        else:
            if name is None:
                raise RefusedError(f"target {target!r} does not exist")
            dom = info["domains"][name]
            if dom.get("power_state") != "Running":
                if not resolution.autostart:
                    raise RefusedError(f"{name!r} is not running and autostart=no")
                try:
                    await self.qubesd.start(name)
                except (QubesdError, QubesdUnavailableError) as exc:
                    raise RefusedError(f"cannot start {name!r}: {exc}") from None
            await self._call_vm(request, name, user, reader, writer)

    # --- dispatch -----------------------------------------------------------------------------

    async def _call_vm(
        self,
        request: CallRequest,
        name: str,
        user: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if user not in USERS:
            raise RefusedError(f"user {user!r} does not exist in {name!r}")
        await self.ensure_agent(name)
        try:
            agent_reader, agent_writer = await asyncio.open_unix_connection(
                str(self.paths.qrexec_daemon_sock(name))
            )
        except OSError as exc:
            log.warning("cannot reach the agent of %s: %s", name, exc)
            raise RefusedError(f"qube {name!r} has no running agent") from None
        try:
            # what qrexec-daemon sends the agent: the user and the service call line
            command = f"{user}:QUBESRPC {request.service_and_arg} {request.source}"
            agent_writer.write(wire.encode_frame(wire.REQUEST, command.encode()))
            writer.write(wire.encode_frame(wire.ACCEPTED))
            await stream_agent(agent_reader, agent_writer, reader, writer, self.config)
        finally:
            agent_writer.close()
            with contextlib.suppress(Exception):
                await agent_writer.wait_closed()

    async def _call_dispvm(
        self,
        request: CallRequest,
        template: str,
        user: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        try:
            uuid = await self.qubesd.create_disposable(template)
            info = await self.qubesd.system_info()
        except (QubesdError, QubesdUnavailableError) as exc:
            raise RefusedError(f"cannot create a disposable from {template!r}: {exc}") from None
        name = _domain_name(info, uuid)
        if name is None:
            raise RefusedError(f"new disposable {uuid!r} not found in system info")
        try:
            try:
                await self.qubesd.start(name)
            except (QubesdError, QubesdUnavailableError) as exc:
                raise RefusedError(f"cannot start disposable {name!r}: {exc}") from None
            await self._call_vm(request, name, user, reader, writer)
        finally:
            await self.drop_agent(name)
            await self._discard_disposable(name)

    async def _discard_disposable(self, name: str) -> None:
        """Kill the call's disposable (qubesd's auto-cleanup then removes it); one that never
        ran cannot be killed, so it is removed directly."""
        try:
            await self.qubesd.kill(name)
        except QubesdError as exc:
            if exc.exc_class in {"QubesVMNotStartedError", "QubesVMNotRunningError"}:
                with contextlib.suppress(QubesdError, QubesdUnavailableError):
                    await self.qubesd.call(name, "admin.vm.Remove")
        except QubesdUnavailableError as exc:
            log.warning("could not kill disposable %s: %s", name, exc)

    async def _call_dom0(
        self,
        request: CallRequest,
        requested_target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if requested_target.startswith("@"):
            target_type, target_value = "keyword", requested_target[1:]
        else:
            target_type, target_value = "name", requested_target
        path = find_dom0_service(self.paths, request.service, request.arg)
        writer.write(wire.encode_frame(wire.ACCEPTED))
        if path is None:
            log.warning("dom0 service %s not found", request.service_and_arg)
            writer.write(wire.encode_exit(wire.EXIT_NOT_FOUND))
            await writer.drain()
            return
        if path.is_socket():
            descriptor = (
                f"{request.service_and_arg} {request.source} {target_type} {target_value}\0"
            )
            await stream_socket(path, descriptor.encode(), reader, writer, self.config)
            return
        env = {key: os.environ[key] for key in _DOM0_ENV_PASSTHROUGH if key in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env |= {
            # Emulator extension: lets dom0 services find the emulated dom0 they belong to.
            "QUBES_SIM_ROOT": str(self.paths.root),
            "QREXEC_SERVICE_FULL_NAME": request.service_and_arg,
            "QREXEC_SERVICE_ARGUMENT": request.arg,
            "QREXEC_REMOTE_DOMAIN": request.source,
            "QREXEC_REQUESTED_TARGET_TYPE": target_type,
        }
        if target_type == "name":
            env["QREXEC_REQUESTED_TARGET"] = target_value
        else:
            env["QREXEC_REQUESTED_TARGET_KEYWORD"] = target_value
        argv = [str(path), request.arg] if request.arg else [str(path)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        try:
            await stream_process(proc, reader, writer, self.config)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def _domain_name(info: dict[str, Any], target: str) -> str | None:
    """A qube name for a policy target given as a name or as ``uuid:…``."""
    domains = info["domains"]
    if target in domains:
        return target
    if target.startswith("uuid:"):
        uuid = target[len("uuid:") :]
        for name, dom in domains.items():
            if isinstance(dom, dict) and dom.get("uuid") == uuid:
                return str(name)
    return None


async def start_router(
    paths: SimPaths,
    operator: AskOperator | None = None,
    *,
    config: RouterConfig | None = None,
) -> Router:
    """Start the router of the emulated dom0 at ``paths`` (qubesd should already run)."""
    router = Router(paths, operator, config=config)
    await router.start()
    return router
