"""Qubes' own policy tools, used by ``install`` when dom0 has them.

- ``qubes-policy-lint FILE…`` (qubes-core-qrexec ``qrexec/tools/qubes_policy_lint.py``) parses
  each file with qrexec's own parser, line by line, and exits 1 printing
  ``PATH:LINE: error: …``. ``install`` runs it on every ``*.policy`` of a copy of the policy
  directory with the rendered file in place, in addition to our engine (``render.stage_policy``):
  a second, independent parser. Any failure refuses the install; nothing is written.
- ``qubes-policy --replace NAME`` (``qrexec/tools/qubes_policy.py``) reads the file's text on
  stdin and calls ``policy.Replace+NAME`` (NAME without ``.policy``), which validates the whole
  directory with the change and replaces the file under the policy admin API's lock, the way
  Qubes' own tools change policy. ``--remove NAME`` calls ``policy.Remove``. It can only change
  the system directory, so it is used only when the configured ``policy_dir`` is that one.

Each tool is looked up on ``PATH``, then in ``/usr/bin`` (``sudo`` may reset ``PATH``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qubes_mcp.dom0.enrolment import PolicyRefusedError

LINT = "qubes-policy-lint"
POLICY = "qubes-policy"
SYSTEM_POLICY_DIR = Path("/etc/qubes/policy.d")
FALLBACK_DIR = Path("/usr/bin")
TIMEOUT = 60.0
#: how much of a tool's output reaches the operator's error line
OUTPUT_CAP = 4000


def find_tool(name: str, path: str | None = None) -> str | None:
    """The tool's path on ``path`` (default ``$PATH``), else in ``/usr/bin``, else None."""
    found = shutil.which(name, path=path if path is not None else os.environ.get("PATH"))
    if found is not None:
        return found
    fallback = FALLBACK_DIR / name
    return str(fallback) if os.access(fallback, os.X_OK) and fallback.is_file() else None


def _run(argv: list[str], stdin: str = "") -> tuple[int, str]:
    try:
        done = subprocess.run(
            argv,
            input=stdin.encode(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 255, f"{type(exc).__name__}: {exc}"
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()[:OUTPUT_CAP]


@dataclass(frozen=True)
class PolicyTools:
    """Which of Qubes' tools ``install`` uses (None: not present)."""

    lint: str | None
    policy: str | None

    @classmethod
    def find(cls, path: str | None = None) -> PolicyTools:
        return cls(find_tool(LINT, path), find_tool(POLICY, path))

    def check(self, policy_dir: Path, name: str, text: str) -> None:
        """Lint the directory as it will be, with ``text`` as ``name``.

        Raises:
            PolicyRefusedError: ``qubes-policy-lint`` failed (its output is the reason).
        """
        if self.lint is None:
            return
        with tempfile.TemporaryDirectory(prefix="qubes-mcp-lint-") as tmp:
            staged = Path(tmp) / "policy.d"
            if policy_dir.is_dir():
                shutil.copytree(policy_dir, staged, symlinks=True)
            staged.mkdir(exist_ok=True)
            (staged / name).write_text(text)
            files = sorted(str(p) for p in staged.glob("*.policy") if p.is_file())
            code, out = _run([self.lint, "--show-line", *files])
        if code != 0:
            shown = out.replace(str(staged), str(policy_dir))
            raise PolicyRefusedError(reason=f"{LINT} exited {code}: {shown or '(no output)'}")

    def writes(self, policy_dir: Path) -> bool:
        """Whether files of ``policy_dir`` are changed through ``qubes-policy``."""
        return self.policy is not None and policy_dir == SYSTEM_POLICY_DIR

    def replace(self, name: str, text: str) -> None:
        """``qubes-policy --replace NAME`` with ``text`` on stdin.

        Raises:
            OSError: the tool failed (the caller rolls back what it changed).
        """
        assert self.policy is not None
        code, out = _run([self.policy, "--replace", name.removesuffix(".policy")], text)
        if code != 0:
            raise OSError(f"{POLICY} --replace exited {code}: {out or '(no output)'}")

    def remove(self, name: str) -> None:
        assert self.policy is not None
        code, out = _run([self.policy, "--remove", name.removesuffix(".policy")])
        if code != 0:
            raise OSError(f"{POLICY} --remove exited {code}: {out or '(no output)'}")
