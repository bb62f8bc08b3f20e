"""qubes.Filecopy end to end: qvm-copy-to-vm / qvm-copy inside one qube, the qfile receiver
inside another, and hostile senders."""

from __future__ import annotations

import asyncio
import errno
import stat
from pathlib import Path

import pytest
from test_qrexec_fakes import Env, emulated

from qubes_mcp.sim.vm_files import qfile

COPY_POLICY = "qubes.Filecopy * work personal allow\nqubes.VMShell * mgmt work allow\n"


def run_env(tmp_path: Path, policy: str, body, answers=()):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with emulated(tmp_path, policy, answers) as env:
            return await body(env)

    return asyncio.run(main())


def in_work(env: Env, script: str):  # type: ignore[no-untyped-def]
    return env.call("mgmt", "work", "qubes.VMShell", script.encode())


def private_files(env: Env, qube: str) -> list[str]:
    top = env.paths.private_dir(qube)
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


@pytest.mark.bwrap
def test_qvm_copy_to_vm_lands_in_qubes_incoming_of_the_source(tmp_path: Path) -> None:
    script = (
        "mkdir -p proj/src && echo code > proj/src/main.c && ln -s main.c proj/src/link"
        " && printf 'x%.0s' $(seq 1 100000) > big && chmod 640 big"
        " && qvm-copy-to-vm personal proj big; echo rc=$?\n"
    )

    async def body(env: Env) -> None:
        result = await in_work(env, script)
        assert (result.stdout, result.stderr) == (b"rc=0\n", b"")
        incoming = env.paths.private_dir("personal") / "home/user/QubesIncoming/work"
        assert (incoming / "proj/src/main.c").read_text() == "code\n"
        assert (incoming / "proj/src/link").readlink() == Path("main.c")
        assert (incoming / "big").read_bytes() == b"x" * 100000
        assert stat.S_IMODE((incoming / "big").stat().st_mode) == 0o640

    run_env(tmp_path, COPY_POLICY, body)


@pytest.mark.bwrap
def test_refused_copy_exits_126_and_writes_nothing(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        result = await in_work(env, "echo x > f; qvm-copy-to-vm vault f; echo rc=$?\n")
        assert (result.stdout, result.stderr) == (b"rc=126\n", b"Request refused\n")
        assert "home/user/QubesIncoming" not in private_files(env, "vault")

    run_env(tmp_path, COPY_POLICY, body)


@pytest.mark.bwrap
def test_qvm_copy_asks_the_operator_for_the_target(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        result = await in_work(env, "echo hi > note; qvm-copy note; echo rc=$?\n")
        assert result.stdout == b"rc=0\n"
        question = env.operator.asked[0]
        assert (question.source, question.service_and_arg) == ("work", "qubes.Filecopy+")
        assert "vault" in question.targets
        note = env.paths.private_dir("vault") / "home/user/QubesIncoming/work/note"
        assert note.read_text() == "hi\n"

    run_env(tmp_path, "qubes.VMShell * mgmt work allow\n", body, answers=["vault"])


@pytest.mark.bwrap
def test_existing_file_is_not_overwritten(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await in_work(env, "echo one > f; qvm-copy-to-vm personal f\n")
        result = await in_work(env, "echo two > f; qvm-copy-to-vm personal f; echo rc=$?\n")
        assert result.stdout == b"rc=1\n"
        assert result.stderr == b'A file named "f" already exists in QubesIncoming dir\n'
        incoming = env.paths.private_dir("personal") / "home/user/QubesIncoming/work"
        assert (incoming / "f").read_text() == "one\n"

    run_env(tmp_path, COPY_POLICY, body)


def hdr(name: bytes, mode: int, size: int) -> bytes:
    return qfile.FILE_HEADER.pack(len(name) + 1, mode, size, 0, 0, 0, 0) + name + b"\0"


END = qfile.FILE_HEADER.pack(0, 0, 0, 0, 0, 0, 0)
REG = stat.S_IFREG | 0o644


@pytest.mark.parametrize(
    ("stream", "code"),
    [
        pytest.param(
            hdr(b"../../../.bashrc", REG, 4) + b"evil" + END, errno.EILSEQ, id="dotdot-into-home"
        ),
        pytest.param(
            hdr(b"/rw/config/rc.local", REG, 4) + b"evil" + END, errno.EILSEQ, id="absolute-path"
        ),
        pytest.param(
            hdr(b"d", stat.S_IFDIR | 0o755, 0)
            + hdr(b"d/l", stat.S_IFLNK | 0o777, 5)
            + b"../.."
            + END,
            errno.ENOLINK,
            id="symlink-out-of-incoming",
        ),
        pytest.param(
            hdr(b"x\x1b]0;pwn\x07", REG, 0) + END, errno.EILSEQ, id="terminal-escape-name"
        ),
    ],
)
@pytest.mark.bwrap
def test_hostile_sender_is_refused_inside_the_receiving_qube(
    tmp_path: Path, stream: bytes, code: int
) -> None:
    async def body(env: Env) -> None:
        before = private_files(env, "personal")
        result = await env.call("work", "personal", "qubes.Filecopy", stream)
        assert result.exit_code == code & 0xFF
        answer = qfile.parse_result(result.stdout)
        assert answer is not None and answer.error_code == code
        after = private_files(env, "personal")
        new = set(after) - set(before)
        parents = {"home", "home/user", "home/user/QubesIncoming"}
        incoming = "home/user/QubesIncoming/work"
        assert all(p in parents or p == incoming or p.startswith(incoming + "/") for p in new)
        assert not any(p.endswith((".bashrc", "rc.local", "/l")) for p in new), new

    run_env(tmp_path, "qubes.Filecopy * work personal allow\n", body)
