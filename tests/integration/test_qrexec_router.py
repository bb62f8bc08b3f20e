"""The router end to end over its sockets: policy verdicts, dom0 services, qubes, disposables."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from test_qrexec_fakes import Env, emulated, until

from qubes_mcp.sim.qrexec import wire
from qubes_mcp.sim.qrexec.client import call

DUMP = '#!/bin/sh\nprintf \'argv:%s\\n\' "$0" "$@"\nenv | grep ^QREXEC_ | sort\ncat\nexit 5\n'


def _host_processes_with(marker: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def run_env(tmp_path: Path, policy: str, body, answers=()):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with emulated(tmp_path, policy, answers) as env:
            return await body(env)

    return asyncio.run(main())


# --- verdicts -------------------------------------------------------------------------------


def test_denied_call_exits_126_with_request_refused(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        result = await env.call("work", "vault", "qubes.VMShell", b"touch /rw/pwned\n")
        assert (result.exit_code, result.stdout, result.stderr) == (126, b"", b"Request refused\n")
        assert env.calls("admin.vm.Start") == []  # a refused call starts nothing

    run_env(tmp_path, "", body)


@pytest.mark.parametrize(
    ("source", "target", "service"),
    [
        pytest.param("nosuch", "dom0", "test.Dump", id="unknown-source"),
        pytest.param("work", "@anyvm", "test.Dump", id="anyvm-as-requested-target"),
        pytest.param("work", "@tag:x", "test.Dump", id="tag-as-requested-target"),
        pytest.param("work", "work", "qubes.VMShell", id="loopback"),
        pytest.param("work", "nosuch", "qubes.VMShell", id="unknown-target-is-default"),
    ],
)
def test_refusals(tmp_path: Path, source: str, target: str, service: str) -> None:
    policy = "test.Dump * @anyvm @anyvm allow target=dom0\nqubes.VMShell * @anyvm @anyvm allow\n"

    async def body(env: Env) -> None:
        env.dom0_service("test.Dump", DUMP)
        result = await env.call(source, target, service)
        assert result.exit_code == 126

    run_env(tmp_path, policy, body)


def test_policy_that_does_not_parse_denies_everything(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.dom0_service("test.Dump", DUMP)
        assert (await env.call("work", "dom0", "test.Dump")).exit_code == 5
        env.set_policy("test.Dump * @anyvm dom0 allow bogus=1\n")
        assert (await env.call("work", "dom0", "test.Dump")).exit_code == 126
        env.set_policy("test.Dump * @anyvm dom0 allow\n")  # fixed: reloaded on next call
        assert (await env.call("work", "dom0", "test.Dump")).exit_code == 5

    run_env(tmp_path, "test.Dump * @anyvm dom0 allow\n", body)


def test_ask_goes_to_the_operator(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.dom0_service("test.Dump", DUMP)
        allowed = await env.call("work", "dom0", "test.Dump")
        denied = await env.call("work", "dom0", "test.Dump")
        assert (allowed.exit_code, denied.exit_code) == (5, 126)
        question = env.operator.asked[0]
        assert (question.source, question.service_and_arg) == ("work", "test.Dump+")
        assert question.targets == ("dom0",)

    run_env(tmp_path, "test.Dump * @anyvm dom0 ask\n", body, answers=["dom0"])


# --- dom0 services --------------------------------------------------------------------------


def test_dom0_executable_gets_exact_argv_environment_stdin_and_exit_code(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        path = env.dom0_service("test.Dump", DUMP)
        with_arg = await env.call("work", "@adminvm", "test.Dump+some.arg", b"payload")
        no_arg = await env.call("work", "vault", "test.Dump", b"")
        assert with_arg.exit_code == 5
        assert with_arg.stdout.decode().splitlines() == [
            f"argv:{path}",
            "argv:some.arg",
            "QREXEC_REMOTE_DOMAIN=work",
            "QREXEC_REQUESTED_TARGET_KEYWORD=adminvm",
            "QREXEC_REQUESTED_TARGET_TYPE=keyword",
            "QREXEC_SERVICE_ARGUMENT=some.arg",
            "QREXEC_SERVICE_FULL_NAME=test.Dump+some.arg",
            "payload",
        ]
        assert no_arg.stdout.decode().splitlines() == [
            f"argv:{path}",
            "QREXEC_REMOTE_DOMAIN=work",
            "QREXEC_REQUESTED_TARGET=vault",
            "QREXEC_REQUESTED_TARGET_TYPE=name",
            "QREXEC_SERVICE_ARGUMENT=",
            "QREXEC_SERVICE_FULL_NAME=test.Dump+",
        ]

    run_env(
        tmp_path,
        "test.Dump * work @anyvm allow target=dom0\ntest.Dump * work @adminvm allow\n",
        body,
    )


def test_missing_dom0_service_exits_127(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        assert (await env.call("work", "dom0", "no.Such")).exit_code == 127

    run_env(tmp_path, "no.Such * work dom0 allow\n", body)


def test_socket_service_gets_the_descriptor_then_stdin(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def body(env: Env) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read())
            writer.write(b"0\0reply")
            writer.close()

        env.paths.rpc_dir.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(serve, path=str(env.paths.rpc_dir / "test.Sock"))
        async with server:
            to_vault = await env.call("mgmt", "vault", "test.Sock+netvm", b"PAYLOAD")
            to_admin = await env.call("mgmt", "@adminvm", "test.Sock")
        assert (to_vault.exit_code, to_vault.stdout, to_vault.stderr) == (0, b"0\0reply", b"")
        assert to_admin.exit_code == 0

    run_env(
        tmp_path,
        "test.Sock * mgmt @anyvm allow target=dom0\ntest.Sock * mgmt @adminvm allow target=dom0\n",
        body,
    )
    assert received == [
        b"test.Sock+netvm mgmt name vault\0PAYLOAD",
        b"test.Sock+ mgmt keyword adminvm\0",
    ]


def test_a_socket_service_that_answers_before_reading_everything_is_heard(
    tmp_path: Path,
) -> None:
    """The gate refuses an oversized request after reading only part of it, answers and
    closes: the answer must reach the caller although the rest of the input cannot."""

    async def body(env: Env) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(1000)
            await asyncio.sleep(0.01)  # the caller's input fills the socket meanwhile
            writer.write(b"too large")
            writer.close()

        env.paths.rpc_dir.mkdir(parents=True, exist_ok=True)
        server = await asyncio.start_unix_server(serve, path=str(env.paths.rpc_dir / "test.Early"))
        async with server:
            for _ in range(20):
                result = await env.call("mgmt", "@adminvm", "test.Early", b"x" * 4_000_000)
                assert (result.exit_code, result.stdout) == (0, b"too large")

    run_env(tmp_path, "test.Early * mgmt @adminvm allow target=dom0\n", body)


# --- qubes ----------------------------------------------------------------------------------


@pytest.mark.bwrap
def test_vm_target_runs_in_its_sandbox_as_the_caller_sees_it(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        result = await env.call(
            "work", "personal", "qubes.VMShell", b"hostname; echo $QREXEC_REMOTE_DOMAIN; id -u\n"
        )
        assert (result.exit_code, result.stdout) == (0, b"personal\nwork\n1000\n")
        # personal was halted: qrexec-daemon starts it first (autostart defaults to yes)
        assert [c[3] for c in env.calls("admin.vm.Start")] == ["personal"]
        assert env.fake.domains["personal"]["power_state"] == "Running"
        assert env.paths.vm_agent_sock("personal").is_socket()

    run_env(tmp_path, "qubes.VMShell * work personal allow\n", body)


def test_autostart_no_refuses_a_halted_target(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        assert (await env.call("work", "vault", "qubes.VMShell", b"true\n")).exit_code == 126
        assert env.calls("admin.vm.Start") == []

    run_env(tmp_path, "qubes.VMShell * work vault allow autostart=no\n", body)


def test_target_that_fails_to_start_is_refused(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.fake.domains["vault"]["tags"].append("no-start")
        assert (await env.call("work", "vault", "qubes.VMShell", b"true\n")).exit_code == 126

    run_env(tmp_path, "qubes.VMShell * work vault allow\n", body)


@pytest.mark.bwrap
def test_policy_user_root(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        assert (await env.call("mgmt", "work", "qubes.VMShell", b"id -u\n")).stdout == b"0\n"

    run_env(tmp_path, "qubes.VMShell * mgmt work allow user=root\n", body)


@pytest.mark.bwrap
def test_dispvm_is_created_started_used_and_killed(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        result = await env.call("work", "@dispvm", "qubes.VMShell", b"hostname\n")
        name = result.stdout.decode().strip()
        assert result.exit_code == 0 and name.startswith("disp")
        await until(lambda: bool(env.calls("admin.vm.Kill")))  # when the connection ends
        await until(lambda: name not in env.fake.domains)  # once its sandbox is gone
        methods = [(m, d, p) for m, _a, _s, d, p in env.fake.record if m.startswith("admin.vm.")]
        assert methods == [
            ("admin.vm.CreateDisposable", "default-dvm", b"uuid"),
            ("admin.vm.Start", name, b""),
            ("admin.vm.Kill", name, b""),
        ]
        assert name not in env.fake.domains
        assert not env.paths.vm_agent_sock(name).exists()
        assert env.fake.hypervisor is not None and not env.fake.hypervisor.running(name)

    run_env(tmp_path, "", body)  # the stock policy allows qubes.VMShell to @dispvm


def test_disposable_that_fails_to_start_is_refused_and_removed(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        env.fake.disposable_tags = ("no-start",)
        result = await env.call("work", "@dispvm", "qubes.VMShell", b"hostname\n")
        assert result.exit_code == 126
        await until(lambda: bool(env.calls("admin.vm.Remove")))
        (removed,) = [c[3] for c in env.calls("admin.vm.Remove")]
        assert removed.startswith("disp") and removed not in env.fake.domains

    run_env(tmp_path, "", body)


def test_dom0_spelled_by_uuid_runs_on_the_host_not_in_a_sandbox(tmp_path: Path) -> None:
    policy = "test.Dump * work @anyvm allow target=uuid:00000000-0000-0000-0000-000000000000\n"

    async def body(env: Env) -> None:
        env.dom0_service("test.Dump", DUMP)
        result = await env.call("work", "vault", "test.Dump")
        assert result.exit_code == 5
        assert b"QREXEC_REQUESTED_TARGET=vault" in result.stdout
        assert env.fake.hypervisor is None or "dom0" not in env.fake.hypervisor.machines

    run_env(tmp_path, policy, body)


@pytest.mark.bwrap
def test_qube_shutdown_kills_its_running_calls(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        task = asyncio.create_task(env.call("mgmt", "work", "qubes.VMShell", b"sleep 600\n"))
        await until(lambda: _host_processes_with(b"sleep\x00600"))
        from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient

        await QubesdClient(env.paths).kill("work")
        result = await asyncio.wait_for(task, 20)
        assert result.exit_code != 0
        await until(lambda: not env.paths.vm_agent_sock("work").exists())

    run_env(tmp_path, "qubes.VMShell * mgmt work allow\n", body)


def test_agent_socket_follows_domain_start_events(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient

        assert env.paths.vm_agent_sock("work").is_socket()  # running when the router started
        assert not env.paths.vm_agent_sock("vault").exists()
        await QubesdClient(env.paths).start("vault")
        await until(lambda: env.paths.vm_agent_sock("vault").is_socket())

    run_env(tmp_path, "", body)


# --- calls from inside qubes ----------------------------------------------------------------


@pytest.mark.bwrap
def test_qube_cannot_spoof_its_source(tmp_path: Path) -> None:
    spoof = (
        "/run/qubes-sim/python -c '\n"
        "import socket, sys\n"
        'sys.path.insert(0, "/run/qubes-sim/lib")\n'
        "from qubes_mcp.sim.qrexec import wire\n"
        's = socket.socket(socket.AF_UNIX); s.connect("/run/qubes-sim/router/agent.sock")\n'
        's.sendall(wire.encode_request("dom0", "test.Who", "mgmt"))\n'
        "print(wire.read_frame_sync(s))'\n"
        "qrexec-client-vm dom0 test.Who; echo rc=$?\n"
    )

    async def body(env: Env) -> None:
        env.dom0_service("test.Who", "#!/bin/sh\necho caller=$QREXEC_REMOTE_DOMAIN\n")
        result = await env.call("mgmt", "work", "qubes.VMShell", spoof.encode())
        assert result.stdout.decode().splitlines() == [f"({wire.REFUSED}, b'')", "rc=126"]
        assert result.stderr == b"Request refused\n"
        ok = await env.call("mgmt", "dom0", "test.Who")
        assert ok.stdout == b"caller=mgmt\n"

    run_env(tmp_path, "test.Who * mgmt dom0 allow\nqubes.VMShell * mgmt work allow\n", body)


@pytest.mark.bwrap
def test_qrexec_client_vm_with_local_program(tmp_path: Path) -> None:
    script = (
        "qrexec-client-vm @adminvm test.Upper sh -c 'echo hello; read r; echo got:$r >&2; exit 3'"
        "; echo rc=$?\n"
    )

    async def body(env: Env) -> None:
        env.dom0_service("test.Upper", '#!/bin/sh\nread line\necho "$line" | tr a-z A-Z\n')
        result = await env.call("mgmt", "work", "qubes.VMShell", script.encode())
        assert result.stdout == b"rc=3\n"
        assert result.stderr == b"got:HELLO\n"

    run_env(tmp_path, "test.Upper * work @adminvm allow\nqubes.VMShell * mgmt work allow\n", body)


# --- robustness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="immediate-eof"),
        pytest.param(b"\xff" * 64, id="unknown-frame"),
        pytest.param(wire.encode_frame(wire.STDIN, b"x"), id="stdin-before-request"),
        pytest.param(b"\x01\xff\xff\xff\xff", id="huge-length"),
        pytest.param(wire.encode_frame(wire.REQUEST, b"no-separators"), id="bad-request"),
    ],
)
def test_garbage_is_refused_and_router_keeps_serving(tmp_path: Path, garbage: bytes) -> None:
    async def body(env: Env) -> None:
        env.dom0_service("test.Dump", DUMP)
        for sock_path in (env.paths.router_sock, env.paths.vm_agent_sock("work")):
            with socket.socket(socket.AF_UNIX) as raw:
                raw.connect(str(sock_path))
                raw.sendall(garbage)
                raw.shutdown(socket.SHUT_WR)
                reply = await asyncio.to_thread(raw.recv, 100)
            assert reply in (b"", wire.encode_frame(wire.REFUSED))
        assert (await env.call("work", "dom0", "test.Dump")).exit_code == 5

    run_env(tmp_path, "test.Dump * work dom0 allow\n", body)


def test_router_socket_is_private_to_the_host_user(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        assert os.stat(env.paths.router_sock).st_mode & 0o077 == 0

    run_env(tmp_path, "", body)


def test_call_without_router_raises(tmp_path: Path) -> None:
    from qubes_mcp.sim.paths import SimPaths
    from qubes_mcp.sim.qrexec.client import RouterUnavailableError

    with pytest.raises(RouterUnavailableError):
        asyncio.run(call(SimPaths(tmp_path), source="work", target="dom0", service_and_arg="x"))


@pytest.mark.bwrap
def test_per_qube_custom_service_in_rw_usrlocal(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        rpc = env.paths.private_dir("work") / "usrlocal/etc/qubes-rpc"
        rpc.mkdir(parents=True)
        (rpc / "my.Service").write_text("#!/bin/sh\necho custom:$1:$QREXEC_SERVICE_FULL_NAME\n")
        (rpc / "my.Service").chmod(0o755)
        result = await env.call("mgmt", "work", "my.Service+arg1")
        assert (result.exit_code, result.stdout) == (0, b"custom:arg1:my.Service+arg1\n")
        missing = await env.call("mgmt", "work", "no.Such")
        assert missing.exit_code == 127

    run_env(tmp_path, "my.Service * mgmt work allow\nno.Such * mgmt work allow\n", body)


@pytest.mark.bwrap
def test_vmexec_decodes_its_argument_and_runs_without_a_shell(tmp_path: Path) -> None:
    from qubes_mcp.sim.vm_files.vmexec import encode_args

    async def body(env: Env) -> None:
        arg = encode_args([b"printf", b"%s|", b"a b", b"$(id)", b"-n"])
        result = await env.call("mgmt", "work", f"qubes.VMExec+{arg}")
        assert (result.exit_code, result.stdout) == (0, b"a b|$(id)|-n|")
        bad = await env.call("mgmt", "work", "qubes.VMExec+ls+-zz")
        assert bad.exit_code == 1

    run_env(tmp_path, "qubes.VMExec * mgmt work allow\n", body)


def test_concurrent_calls_per_source_are_capped(tmp_path: Path) -> None:
    from test_qrexec_fakes import emulated as emulated_with

    from qubes_mcp.sim.qrexec.config import RouterConfig

    async def main() -> None:
        config = RouterConfig(max_calls_per_source=1)
        async with emulated_with(tmp_path, "test.Wait * @anyvm dom0 allow\n", (), config) as env:
            env.dom0_service("test.Wait", "#!/bin/sh\nread line\necho $line\n")
            read_fd, write_fd = os.pipe()
            with os.fdopen(read_fd, "rb") as held_stdin:
                first = asyncio.create_task(
                    call(
                        env.paths,
                        source="work",
                        target="dom0",
                        service_and_arg="test.Wait",
                        stdin=held_stdin,
                        timeout=30,
                    )
                )
                await until(lambda: env.router._in_flight.get("work", 0) == 1)
                second = await env.call("work", "dom0", "test.Wait", b"y\n")
                other = await env.call("personal", "dom0", "test.Wait", b"z\n")
                assert (second.exit_code, other.exit_code, other.stdout) == (126, 0, b"z\n")
                os.write(write_fd, b"x\n")
                os.close(write_fd)
                done = await first
            assert (done.exit_code, done.stdout) == (0, b"x\n")

    asyncio.run(main())


def test_without_bwrap_a_qube_call_is_refused_never_run_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qubes_mcp.sim import sandbox

    monkeypatch.setattr(sandbox, "_bwrap_checked", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda _name: None)
    marker = tmp_path / "ran-on-host"

    async def body(env: Env) -> None:
        result = await env.call("mgmt", "work", "qubes.VMShell", f"touch {marker}\n".encode())
        assert (result.exit_code, result.stderr) == (126, b"Request refused\n")

    run_env(tmp_path, "qubes.VMShell * mgmt work allow\n", body)
    assert not marker.exists()
