"""``qubes-mcp demo``: a second demo on the same root, or a busy ``--serve`` port, is one clear
line before anything is played or deleted."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_mcp import cli, demo


def test_a_busy_port_is_refused_before_anything_is_played(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / "keep").write_text("the previous run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["demo", "--serve", "--root", str(root), "--port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"qubes-mcp demo: port {port} on 127.0.0.1 is in use (another `make run`?)" in err
    assert (root / "keep").exists()  # nothing deleted, nothing started


def test_a_free_port_passes_the_check() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    demo.check_port(port)


def test_a_second_demo_on_the_same_root_says_who_holds_it(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / "keep").write_text("the running demo's state")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from qubes_mcp import demo\n"
            f"with demo.locked_root(Path({str(root)!r})):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            [sys.executable, "-m", "qubes_mcp.cli", "demo", "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 1
    assert f"another demo is running on {root} (pid {holder.pid})" in out.stderr
    assert (root / "keep").exists()
    # once the holder is gone, the lock is free again
    with demo.locked_root(root):
        pass
