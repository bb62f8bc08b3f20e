"""docs/operator-guide.md, followed step by step on the emulator.

The commands run here are read from the guide's ``sh`` blocks, in order, so a command the
guide gets wrong fails this test. What the emulator cannot be is translated, and each
translation is one rule below (``Guide._run``):

- ``sudo`` is dropped; absolute paths (``/etc``, ``/usr``, ``/var``, ``/tmp``) are under the
  emulator's root; ``qubes-mcp-admin`` is the launcher the guide installed from the bundle
  (``ROOT/usr/bin/qubes-mcp-admin``), given ``--root ROOT`` (or ``--config`` where a subcommand
  takes no root).
- ``qvm-run --pass-io build-dvm 'cat FILE' > OUT`` copies the artefact this test built with
  the tool the guide names (the file name must be the one the build wrote).
- ``systemctl … qubes-mcp-gate`` runs, signals or stops the unit's own ``ExecStart`` line.
- ``sudoedit`` makes one edit the next ``install`` must bring into force.
- The guide's example ids (a pending request, a plan, a checkpoint) are replaced by the real
  ones the emulator produced; ``--follow`` runs for two seconds.
The section that installs the RPM instead of the bundle is the alternative path, checked by
tests/unit/test_rpm.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_emulator, stop_process
from tests.gate_e2e import gate_call

pytestmark = pytest.mark.bwrap

TOP = Path(__file__).resolve().parents[2]
GUIDE = TOP / "docs" / "operator-guide.md"
#: the words that start a command in the guide's sh blocks (other lines are sample output)
COMMANDS = {"sudo", "sudoedit", "qvm-run", "sha256sum"}
#: the one edit made where the guide says to edit the configuration
EDIT = ("max_qubes = ", "max_qubes = 3")
ROOTED = ("/etc/", "/usr/", "/var/", "/tmp/")


def guide_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Every ``sh`` block with the heading it sits under, skipping the RPM alternative."""
    blocks: list[tuple[str, list[str]]] = []
    heading, block = "", None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif block is None and stripped == "```sh":
            block = []
        elif block is not None and stripped == "```":
            if "RPM" not in heading:
                blocks.append((heading, block))
            block = None
        elif block is not None and stripped.split(" ", 1)[0] in COMMANDS:
            block.append(stripped)
    return blocks


class Guide:
    """The operator, doing what the guide says, in an emulated dom0 at ``root``."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.gate: subprocess.Popen[bytes] | None = None
        self.out: dict[str, subprocess.CompletedProcess[str]] = {}
        self.ids: dict[str, str] = {}
        bundle = subprocess.run(
            [sys.executable, str(TOP / "tools/build_dom0_bundle.py"), "--out", str(work)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        self.bundle_hash, self.bundle = bundle[0], Path(bundle[1])

    # -- translation -------------------------------------------------------------------------
    def path(self, word: str) -> str:
        if word.startswith(str(self.root)):  # written by install --root: already there
            return word
        return str(self.root) + word if word.startswith(ROOTED) else word

    def run(self, line: str) -> None:
        words = shlex.split(line, comments=True)
        for placeholder, real in self.ids.items():
            words = [w.replace(placeholder, real) for w in words]
        command: list[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                command.append(word)
                continue
            while command and command[0] == "sudo":
                command.pop(0)
            self._run(line, command)
            command = []

    def _run(self, line: str, words: list[str]) -> None:
        name, args = words[0], words[1:]
        if name == "qvm-run":
            assert args[:2] == ["--pass-io", "build-dvm"] and args[3] == ">", line
            wanted = Path(args[2].removeprefix("cat ").strip("'\"")).name
            assert wanted == self.bundle.name, f"the guide fetches {wanted}, the build wrote"
            Path(self.path(args[4])).parent.mkdir(parents=True, exist_ok=True)  # dom0 has /tmp
            shutil.copy(self.bundle, self.path(args[4]))
        elif name == "sha256sum":
            digest = hashlib.sha256(Path(self.path(args[0])).read_bytes()).hexdigest()
            assert digest == self.bundle_hash
        elif name == "mkdir":
            Path(self.path(args[-1])).mkdir(parents=True, exist_ok=True)
        elif name == "tar":
            assert args[0] == "-xzf" and args[2] == "-C", line
            with tarfile.open(self.path(args[1])) as tar:
                tar.extractall(self.path(args[3]), filter="data")
        elif name == "ln":
            link = Path(self.path(args[-1]))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(self.path(args[-2]))
        elif name == "sudoedit":
            config = Path(self.path(args[0]))
            text = config.read_text()
            assert EDIT[0] in text, "the new config has no budget to edit"
            config.write_text(re.sub(r"max_qubes = \d+", EDIT[1], text))
        elif name == "systemctl":
            self.systemctl(args)
        elif name == "cp":
            shutil.copytree(self.path(args[-2]), self.work / "backup", symlinks=True)
        elif name == "qubes-mcp-admin":
            self.admin(line, args)
        else:
            raise AssertionError(f"no rule for {line!r}")

    def admin(self, line: str, args: list[str]) -> None:
        args = [w for w in args if w not in ("|", "jq", ".")]  # `| jq .`: parsed below
        where = ["--root", str(self.root)] if _takes_root(args) else ["--config", self.config]
        launcher = self.root / "usr/bin/qubes-mcp-admin"
        argv = [sys.executable, "-I", str(launcher), *args, *where]
        timeout = 2 if "--follow" in args else 120
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:  # --follow: printed, then kept watching
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            result = subprocess.CompletedProcess(argv, 0, out, "")
        self.out[line] = result
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        if "--json" in args and args[:2] == ["audit", "show"]:
            assert all(json.loads(row) for row in result.stdout.splitlines())
        if args[:2] == ["audit", "verify"]:  # the checkpoint the guide tells you to note
            checkpoint = re.search(r"checkpoint: (\d+:[0-9a-f]+)", result.stdout)
            assert checkpoint, result.stdout
            self.ids["SEQ:HASH"] = self.ids["1234:9f86d0…"] = checkpoint.group(1)

    @property
    def config(self) -> str:
        return str(self.root / "etc/qubes-mcp/config.toml")

    def systemctl(self, args: list[str]) -> None:
        assert args[-1] == "qubes-mcp-gate", args
        if args[:2] == ["enable", "--now"] or args[0] == "restart":
            self.stop_gate()
            unit = (self.root / "etc/systemd/system/qubes-mcp-gate.service").read_text()
            exec_start = next(
                line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart")
            )
            words = [self.path(w) for w in shlex.split(exec_start)]
            self.gate = subprocess.Popen(
                [sys.executable, "-I", *words],
                stdout=(self.work / "gate.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
            self.wait_serving()
        elif args[:2] == ["disable", "--now"]:
            self.stop_gate()
        elif args[:3] == ["kill", "-s", "HUP"]:
            assert self.gate is not None
            self.gate.send_signal(signal.SIGHUP)
        else:
            raise AssertionError(f"no rule for systemctl {args}")

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.gate is not None and self.gate.poll() is None, "the gate exited"
            launcher = str(self.root / "usr/bin/qubes-mcp-admin")
            status = subprocess.run(
                [sys.executable, "-I", launcher, "status", "--root", str(self.root), "--json"],
                check=False,
                capture_output=True,
                text=True,
            )
            if status.returncode == 0 and json.loads(status.stdout).get("gate") == "serving":
                return
            time.sleep(0.2)
        raise AssertionError("the gate did not start serving")

    def stop_gate(self) -> None:
        if self.gate is not None:
            stop_process(self.gate)
            self.gate = None

    # -- what the agent does meanwhile --------------------------------------------------------
    def stack(self) -> Stack:
        return Stack(self.root)

    def agent_asks_removal(self) -> dict[str, Any]:
        """The agent asks to remove ai-usb (consent); its reply lands in the dict returned."""
        reply: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: reply.update(gate_call(self.stack(), "ai-usb", "qmcp.Remove")),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "3f9c01aa" not in self.ids:
            pending = self.stack().admin("pending", "--json")
            for item in json.loads(pending.stdout or "[]"):
                self.ids["3f9c01aa"] = item["id"]
            time.sleep(0.1)
        assert "3f9c01aa" in self.ids, "the agent's request never reached pending"
        return reply

    def agent_proposes_plan(self) -> None:
        steps = [{"op": "qube.start", "target": "ai-dev", "args": {}}]
        reply = gate_call(self.stack(), "@adminvm", "qmcp.PlanPropose", {"steps": steps})
        self.ids["5d1c0e9a2b7f4a10"] = reply["result"]["plan_id"]


def _takes_root(args: list[str]) -> bool:
    from qubes_mcp.dom0.operator.cli import build_parser

    parser: Any = build_parser()
    for word in args:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return any("--root" in a.option_strings for a in parser._actions)


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guide]:
    work = tmp_path_factory.mktemp("guide")
    fleet = work / "fleet.toml"
    demo = TOP / "src/qubes_mcp/sim/data/fleets/demo.toml"
    fleet.write_text(
        demo.read_text()
        + '\n[[qube]]\nname = "ai-work"\nclass = "AppVM"\nlabel = "blue"\n'
        + 'properties = { netvm = "" }\n'
    )
    root = work / "root"
    root.mkdir()
    emulator = start_emulator(root, fleet)
    g = Guide(root, work)
    try:
        yield g
    finally:
        g.stop_gate()
        stop_process(emulator)


def test_the_operator_guide_works_as_written(guide: Guide) -> None:
    blocks = guide_blocks(GUIDE.read_text())
    headings = [h for h, _ in blocks]
    assert headings[0].startswith("2.") and headings[-1].startswith("8."), headings
    removal: dict[str, Any] = {}
    for heading, lines in blocks:
        if heading.startswith("5."):
            removal = guide.agent_asks_removal()
        if heading == "Plans":
            guide.agent_proposes_plan()
        for line in lines:
            guide.run(line)
        after(guide, heading, removal)


def after(guide: Guide, heading: str, removal: dict[str, Any]) -> None:
    """What each section promised, checked once its commands ran."""
    out = {line.split("  #")[0].strip(): result for line, result in guide.out.items()}
    if heading.startswith("3."):  # serving, the edit in force, nothing for doctor to report
        budget = gate_call(guide.stack(), "@adminvm", "qmcp.Budget")
        assert budget["result"]["max_qubes"] == 3
        assert "error:" not in out["sudo qubes-mcp-admin doctor"].stdout
    if heading.startswith("4."):  # enrolled, tiered, then gone again for the agent
        assert gate_call(guide.stack(), "ai-work", "qmcp.Info") == {"refused": 126}
        assert gate_call(guide.stack(), "ai-dump", "qmcp.Info") == {"refused": 126}
    if heading.startswith("5."):  # the approval went through to the agent
        deadline = time.monotonic() + 60
        while "ok" not in removal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert removal.get("ok") is True, removal
        assert "ai-usb" in out["sudo qubes-mcp-admin pending"].stdout
    if heading == "Plans":
        salt = out[next(k for k in out if k.endswith("--salt"))].stdout
        assert salt.startswith("#!yaml") and "qvm.start" in salt
    if (
        heading.startswith("6.")
        and "sudo qubes-mcp-admin audit show --since 2026-11-29T09:00" in out
    ):
        timeline = out["sudo qubes-mcp-admin audit show --since 2026-11-29T09:00"].stdout
        for act in ("operator.install", "operator.enrol", "operator.approve", "qube.remove"):
            assert act in timeline, act
    if heading.startswith("8."):  # what install wrote is gone
        assert not (guide.root / "etc/qubes/policy.d/25-qubes-mcp.policy").exists()
        assert not list((guide.root / "etc/qubes-rpc").glob("qmcp.*"))


def test_every_command_in_the_guide_has_a_rule() -> None:
    """A command added to the guide that this test cannot follow fails here first."""
    known = {"qubes-mcp-admin", "systemctl", "sudoedit", "qvm-run", "sha256sum", "mkdir", "tar"}
    known |= {"ln", "cp"}
    for _, lines in guide_blocks(GUIDE.read_text()):
        for line in lines:
            for part in re.split(r"&&|\|", line.split("  #")[0]):
                words = [w for w in shlex.split(part) if w != "sudo"]
                assert not words or words[0] in known | {"jq"}, line


def test_the_bundle_is_the_size_the_guide_says(tmp_path: Path) -> None:
    """The guide tells the operator how much code they are about to trust in dom0."""
    text = " ".join(GUIDE.read_text().split())
    said = re.search(
        r"about ([\d,]+) lines in about (\d+) files \(about (\d+) KB compressed\)", text
    )
    assert said, "the guide no longer states the bundle's size"
    lines, files, kb = (int(g.replace(",", "")) for g in said.groups())
    sources = [
        p for part in ("dom0", "policy") for p in (TOP / "src/qubes_mcp" / part).rglob("*.py")
    ]
    real_lines = sum(len(p.read_text().splitlines()) for p in sources)
    assert abs(real_lines - lines) <= lines * 0.1, real_lines
    assert abs(len(sources) - files) <= files * 0.1, len(sources)
    built = subprocess.run(
        [sys.executable, str(TOP / "tools/build_dom0_bundle.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    real_kb = Path(built).stat().st_size / 1000
    assert abs(real_kb - kb) <= kb * 0.1, real_kb
