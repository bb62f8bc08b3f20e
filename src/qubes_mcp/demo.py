"""``qubes-mcp demo``: a scripted agent session through a real MCP client, on the emulator.

It starts an emulated dom0 with the demo fleet, installs the gate into it
(``qubes-mcp-admin install --root``), starts the gate, builds the MCP server on the emulator's
qrexec router, and drives it with FastMCP's client exactly as an agent would — printing what
the agent asks, what dom0 answers, and what the operator sees. With ``--serve`` it then keeps
everything running and serves MCP over HTTP on localhost for your own client.

The root is recreated, so a second demo on the same root must not start: a lock beside the
root (``.ROOT.lock``, ``flock``) makes it say who holds it instead. With ``--serve`` the port is
checked before anything is played, so a busy port is a clear line, not a traceback at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qubes_mcp.stack import Stack, start_stack

_COLOURS = ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[36m", "\033[0m")
BOLD, DIM, RED, GREEN, CYAN, END = _COLOURS if sys.stdout.isatty() else ("",) * 6


def say(text: str) -> None:
    print(f"\n{BOLD}{text}{END}", flush=True)


def show(label: str, value: object, colour: str = "") -> None:
    text = value if isinstance(value, str) else json.dumps(value, indent=2)
    lines = str(text).splitlines() or [""]
    print(f"  {colour}{label}{END} {lines[0]}")
    for line in lines[1:]:
        print(f"  {' ' * len(label)} {line}")


class Operator:
    """The demo's operator in dom0: reads each pending request, answers from a script."""

    def __init__(self, stack: Stack, answers: dict[str, str]) -> None:
        self.stack, self.answers = stack, answers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Operator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pending = json.loads(self.stack.admin("pending", "--json").stdout or "[]")
            for item in pending:
                answer = self.answers.get(item["target"], "deny")
                print(f"\n  {CYAN}[dom0] operator sees:{END} {item['description']}")
                print(f"  {CYAN}[dom0] operator runs:{END} qubes-mcp-admin {answer} {item['id']}")
                self.stack.admin(answer, item["id"])
            self._stop.wait(0.2)


async def _tool(client: Any, tool: str, /, **args: Any) -> Any:
    show("agent →", f"{tool}({', '.join(f'{k}={v!r}' for k, v in args.items())})", DIM)
    result = await client.call_tool(tool, args, raise_on_error=False)
    text = result.content[0].text if result.content else ""
    if result.is_error:
        show("dom0  ✗", text, RED)
        return None
    data = result.structured_content or json.loads(text)
    return data.get("result", data) if isinstance(data, dict) else data


def _dom0_tags(stack: Stack, qube: str) -> list[str]:
    from qubes_mcp.dom0.admin import AdminClient

    tags = asyncio.run(AdminClient(stack.paths.qubesd_sock).lines(qube, "admin.vm.tag.List"))
    return [t for t in tags if t.startswith("ai-")]


async def session(stack: Stack) -> None:
    import logging

    from fastmcp import Client

    from qubes_mcp.server.app import build_server
    from qubes_mcp.server.transport import SimTransport

    # the server logs each refused tool call; the transcript already shows the refusal
    # (set after importing fastmcp, which configures its own logger level on import)
    logging.getLogger("fastmcp").setLevel(logging.CRITICAL)
    server = build_server(SimTransport(stack.root))
    async with Client(server) as client:
        say("1. What may I see? (everything else does not exist for the agent)")
        listing = await _tool(client, "qube_list")
        for q in listing["qubes"]:
            print(f"           {q['name']:<12} {q['class']:<11} {q['state']:<8} tier={q['tier']}")
        print(
            f"           {DIM}(the fleet also has vault, personal, work, sys-net, … "
            f"— never listed){END}"
        )

        say("2. Read a qube: references outside the scope are redacted, tiers stay in dom0")
        info = await _tool(client, "qube_info", qube="ai-dev")
        show(
            "dom0  ✓",
            {k: info[k] for k in ("tags",)}
            | {
                "properties": {k: info["properties"].get(k) for k in ("template", "netvm", "label")}
            },
            GREEN,
        )
        await _tool(client, "qube_info", qube="vault")
        await _tool(client, "qube_info", qube="no-such-qube")

        say("3. Create a qube from a template in the scope")
        created = await _tool(
            client, "qube_create", template="ai-debian", name="ai-demo", label="green"
        )
        show("dom0  ✓", created, GREEN)
        show("[dom0] tags:", " ".join(await asyncio.to_thread(_dom0_tags, stack, "ai-demo")), CYAN)
        clone = await _tool(client, "qube_clone", qube="ai-build", name="ai-scratch")
        show("dom0  ✓", f"{clone['name']}: tier {clone['tier']}, netvm {clone['netvm']}", GREEN)

        say("4. Run a command as root in an exec qube (a bubblewrap sandbox: no network)")
        ran = await _tool(
            client,
            "qube_run",
            qube="ai-dev",
            command=[
                "sh",
                "-c",
                "id -un; hostname; echo hello > /home/user/notes.txt; "
                "(getent hosts example.com || echo no network)",
            ],
        )
        show("dom0  ✓", ran["stdout"].rstrip(), GREEN)

        say("5. Exec needs the exec tier: ai-notes is read-only")
        await _tool(client, "qube_run", qube="ai-notes", command=["id"])

        say("6. Copy a file between exec qubes (qubes.Filecopy, qube to qube)")
        await _tool(
            client,
            "file_copy",
            source="ai-dev",
            destination="ai-build",
            paths=["/home/user/notes.txt"],
        )
        seen = await _tool(
            client,
            "qube_run",
            qube="ai-build",
            command=["cat", "/home/user/QubesIncoming/ai-dev/notes.txt"],
        )
        show("dom0  ✓", f"ai-build has it: {seen['stdout'].strip()}", GREEN)

        say("7. Destructive requests wait for the operator in dom0")
        with Operator(stack, {"ai-scratch": "approve", "ai-usb": "deny"}):
            removed = await _tool(client, "qube_remove", qube="ai-scratch")
            if removed:
                show("dom0  ✓", removed, GREEN)
            await _tool(client, "qube_remove", qube="ai-usb")

        say("8. Retargeting a qube's network is never allowed (egress is the operator's)")
        await _tool(client, "property_set", qube="ai-build", property="netvm", value="ai-web")

        say("9. A lab link: ai-web reaches one port of ai-build through qrexec, nothing else")
        await _lab_link(client, stack)

        say("10. The research loop: snapshot, attack over a link, read the crash, revert")
        await _research_loop(client, stack)

    say("11. The operator verifies the tamper-evident audit log")
    verified = stack.admin("audit", "verify")
    show("[dom0]", verified.stdout.strip() or verified.stderr.strip(), CYAN)


LAB_PORT = 8080
_SERVE = (
    "mkdir -p /tmp/www && echo hello from ai-build > /tmp/www/index.html && "
    f"(nohup python3 -m http.server {LAB_PORT} --bind 127.0.0.1 --directory /tmp/www "
    ">/dev/null 2>&1 &) && for i in $(seq 100); do "
    f"curl -s -o /dev/null 127.0.0.1:{LAB_PORT} && echo serving on 127.0.0.1:{LAB_PORT} "
    "&& exit 0; sleep 0.1; done; exit 1"
)
_FETCH = ["curl", "-sS", "--max-time", "5", f"http://localhost:{LAB_PORT}/"]


async def _lab_link(client: Any, stack: Stack) -> None:
    """An HTTP server in ai-build, a fetch from ai-web: refused, linked, fetched, closed."""

    async def fetch() -> None:
        got = await _tool(client, "qube_run", qube="ai-web", command=_FETCH)
        if got is None:
            return
        ok = got["exit_code"] == 0
        text = (got["stdout"] if ok else f"exit {got['exit_code']}: {got['stderr']}").rstrip()
        show("dom0  ✓" if ok else "curl  ✗", text, GREEN if ok else RED)

    served = await _tool(client, "qube_run", qube="ai-build", command=["sh", "-c", _SERVE])
    if served:
        show("dom0  ✓", served["stdout"].rstrip(), GREEN)
    await fetch()  # no link: nothing listens in ai-web, and qrexec would refuse anyway
    with Operator(stack, {"ai-web": "approve"}):
        opened = await _tool(client, "link_open", client="ai-web", server="ai-build", port=LAB_PORT)
    if opened:
        show("dom0  ✓", opened, GREEN)
        policy = (stack.root / "etc/qubes/policy.d/25-qubes-mcp.policy").read_text()
        for line in policy.splitlines():
            if line.startswith("qubes.ConnectTCP"):
                show("[dom0] policy:", " ".join(line.split()), CYAN)
    await fetch()
    closed = await _tool(client, "link_close", client="ai-web", server="ai-build", port=LAB_PORT)
    if closed:
        show("dom0  ✓", f"link {closed['closed']['id']} closed", GREEN)
    await fetch()


VICTIM_PORT = 9000
#: the victim's service: answers, except that /poc corrupts its config and takes the whole
#: qube down (every process, the qrexec agent included: what a kernel crash leaves behind)
_VICTIM = (
    "mkdir -p /rw/lab && cat > /rw/lab/service.py <<'EOF'\n"
    "import http.server, os, threading\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        if self.path == '/poc':\n"
    "            open('/rw/lab/config', 'w').write('pwned\\n')\n"
    "        self.send_response(200); self.end_headers()\n"
    "        self.wfile.write(b'ok ' + self.path.encode())\n"
    "        if self.path == '/poc': threading.Timer(0.5, os.kill, (-1, 9)).start()\n"
    f"http.server.HTTPServer(('127.0.0.1', {VICTIM_PORT}), H).serve_forever()\n"
    "EOF\n"
    "(nohup python3 /rw/lab/service.py >/dev/null 2>&1 &); for i in $(seq 100); do "
    f"curl -s -o /dev/null 127.0.0.1:{VICTIM_PORT} && echo victim listening && exit 0; "
    "sleep 0.1; done; exit 1"
)


async def _research_loop(client: Any, stack: Stack) -> None:
    """Set up the victim and snapshot it (a shutdown keeps a revision), build the PoC in a
    qube of its own, fire it over a lab link, read the crash on the console, keep the loot in
    the dump sink, revert the victim, and remove the PoC qube with the operator's approval."""

    async def run(qube: str, script: str) -> Any:
        return await _tool(client, "qube_run", qube=qube, command=["sh", "-c", script])

    await run("ai-usb", "mkdir -p /rw/lab && echo clean > /rw/lab/config")
    await _tool(client, "qube_shutdown", qube="ai-usb")  # the snapshot
    await _tool(client, "qube_create", template="ai-debian", name="ai-poc", label="red")
    await run("ai-poc", "echo /poc > /home/user/payload")  # the PoC, built apart from both
    await _tool(
        client, "file_copy", source="ai-poc", destination="ai-web", paths=["/home/user/payload"]
    )
    served = await run("ai-usb", _VICTIM)
    if served:
        show("dom0  ✓", served["stdout"].rstrip(), GREEN)
    with Operator(stack, {"ai-web": "approve", "ai-usb": "approve", "ai-poc": "approve"}):
        await _tool(client, "link_open", client="ai-web", server="ai-usb", port=VICTIM_PORT)
        attack = await run(
            "ai-web",
            f"curl -sS --max-time 5 localhost:{VICTIM_PORT}"
            "$(cat /home/user/QubesIncoming/ai-poc/payload) | tee /home/user/loot.txt",
        )
        if attack:
            show("dom0  ✓", f"attack answered: {attack['stdout'].strip()}", GREEN)
        await _tool(client, "link_close", client="ai-web", server="ai-usb", port=VICTIM_PORT)
        show("agent →", "qube_info(qube='ai-usb') until it is no longer Running", DIM)
        for _ in range(40):
            state = (await client.call_tool("qube_info", {"qube": "ai-usb"})).structured_content
            if state["state"] != "Running":
                break
            await asyncio.sleep(0.25)
        show("dom0  ✓", f"ai-usb is {state['state']} after the attack", GREEN)
        console = await _tool(client, "qube_log", qube="ai-usb", lines=2)
        if console:
            show("dom0  ✓", "console: " + " | ".join(console["lines"]), GREEN)
        loot = await _tool(
            client,
            "file_copy",
            source="ai-web",
            destination="ai-dump",
            paths=["/home/user/loot.txt"],
        )
        if loot:
            show("dom0  ✓", f"the loot is in the dump sink: {loot['landed_in']}", GREEN)
        reverted = await _tool(client, "qube_revert", qube="ai-usb")
        if reverted:
            show("dom0  ✓", reverted, GREEN)
        after = await run("ai-usb", "cat /rw/lab/config")
        if after:
            show("dom0  ✓", f"after revert the config says: {after['stdout'].strip()}", GREEN)
        await _tool(client, "qube_shutdown", qube="ai-poc")
        removed = await _tool(client, "qube_remove", qube="ai-poc")
        if removed:
            show("dom0  ✓", removed, GREEN)


class DemoBusyError(Exception):
    """The root is in use by another demo, or the port is taken (the message says which)."""


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise DemoBusyError if nothing could listen on ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not busy
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc})"
            raise DemoBusyError(
                f"port {port} on {host} {why} (another `make run`?): stop it, or pass --port N"
            ) from None


def lock_path(root: Path) -> Path:
    return root.parent / f".{root.name}.lock"


@contextlib.contextmanager
def locked_root(root: Path) -> Iterator[None]:
    """Hold the root's lock for the whole demo; DemoBusyError if another demo holds it."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise DemoBusyError(
                f"another demo is running on {root} (pid {holder}): stop it (Ctrl-C), "
                "or pass --root DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def main(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    try:
        with locked_root(root):
            if args.serve:
                check_port(args.port)
            return _play(root, args)
    except DemoBusyError as exc:
        print(f"qubes-mcp demo: {exc}", file=sys.stderr)
        return 1


def _play(root: Path, args: argparse.Namespace) -> int:
    if root.exists():
        shutil.rmtree(root)
    say(f"Starting an emulated Qubes dom0 under {root} and installing the gate …")
    stack = start_stack(root)
    try:
        asyncio.run(session(stack))
        if not args.serve:
            return 0
        serve(stack, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def serve(stack: Stack, port: int) -> None:
    from qubes_mcp.server.app import build_server
    from qubes_mcp.server.cli import http_options
    from qubes_mcp.server.transport import SimTransport

    admin = f".venv/bin/qubes-mcp-admin {{pending|approve ID|deny ID}} --config {stack.config}"
    say("The emulated dom0, the gate and the MCP server keep running. Connect a client:")
    print(
        f"""
  MCP (streamable HTTP, localhost only):  http://127.0.0.1:{port}/mcp
  MCP over stdio (e.g. Claude Code):      claude mcp add qubes -- \\
      {Path.cwd()}/.venv/bin/qubes-mcp serve --sim {stack.root}
  Answer consent requests as the operator: {admin}
  Admin API socket (qubesadmin, qubesd-query): {stack.paths.qubesd_sock}
  Ctrl-C stops everything.""",
        flush=True,
    )
    time.sleep(0.1)
    build_server(SimTransport(stack.root)).run(
        transport="http", host="127.0.0.1", port=port, show_banner=False, **http_options()
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="watch a scripted agent session on the emulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", default=".run/demo", help="emulator root (recreated)")
    p.add_argument("--serve", action="store_true", help="keep serving MCP over HTTP afterwards")
    p.add_argument("--port", type=int, default=8765, help="HTTP port on 127.0.0.1")
    p.set_defaults(func=main)
