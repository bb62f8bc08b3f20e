"""Loading the multi-file policy: directories, file names, ordering, directives.

Semantics follow qrexec's ``AbstractFileSystemLoader`` and ``AbstractParser``
(QX ``parser.py``), reference §5.1:

1. In each policy directory take the regular files whose name ends in ``.policy`` and does
   not start with ``.``. If any such name has a character outside ``[0-9a-z_.-]``, the
   whole policy fails to load (qrexec then denies every call).
2. A basename seen in an earlier directory hides the same basename in a later one (qrexec
   lists ``/run/qubes/policy.d`` first, so the runtime copy wins).
3. The files are sorted by basename (codepoint order) and their rules concatenated.
4. ``!include PATH`` and ``!include-dir DIR`` are resolved against the directory of the
   top-level file being loaded; ``!include-service SERVICE ARG PATH`` reads a file in the
   old 3-column syntax. A missing file or directory is a syntax error.
5. ``!compat-4.0`` is accepted and ignored: it loads the pre-R4.1 per-service files from
   ``/etc/qubes-rpc/policy``, which R4.1+ installs convert away (docs/policy-engine.md).

Files are read with a hard byte cap and decoded as UTF-8 with universal newlines, as
Python's ``open()`` does for qrexec. Include cycles and runaway nesting are syntax errors
(qrexec recurses until ``RecursionError``, which also ends in a refusal).
"""

from __future__ import annotations

import posixpath
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from qubes_mcp.policy.errors import PolicySyntaxError
from qubes_mcp.policy.rules import (
    Rule,
    parse_rule,
    parse_service_rule,
    validate_service_and_argument,
)

POLICY_SUFFIX = ".policy"
#: Characters allowed in a policy file name (QX ``FILENAME_ALLOWED_CHARSET``).
FILENAME_CHARSET = frozenset(string.digits + string.ascii_lowercase + "_.-")


@dataclass(frozen=True)
class LoadLimits:
    """Hard caps on what one policy load may read.

    Attributes:
        max_file_bytes: Largest file read; larger is a syntax error.
        max_total_bytes: Largest sum over every file read, includes counted each time.
        max_include_depth: Deepest chain of ``!include*`` directives.
    """

    max_file_bytes: int = 4 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_include_depth: int = 32


DEFAULT_LIMITS = LoadLimits()


class PolicyFiles(Protocol):
    """Where policy text comes from: real directories, or an in-memory mapping."""

    def list_dir(self, directory: str) -> list[str]:
        """Names of the regular files directly in ``directory`` (raise OSError if missing)."""

    def is_file(self, path: str) -> bool:
        """Whether ``path`` is a regular file (following symlinks)."""

    def is_dir(self, path: str) -> bool:
        """Whether ``path`` is a directory."""

    def read(self, path: str, limit: int) -> bytes:
        """Up to ``limit + 1`` bytes of ``path`` (raise OSError on failure)."""

    def resolve(self, base: str, included: str) -> str:
        """The path ``included`` names when written in a file loaded from ``base``."""


class DiskFiles:
    """Policy files on the local file system."""

    def list_dir(self, directory: str) -> list[str]:
        return [entry.name for entry in Path(directory).iterdir() if entry.is_file()]

    def is_file(self, path: str) -> bool:
        return Path(path).is_file()

    def is_dir(self, path: str) -> bool:
        return Path(path).is_dir()

    def read(self, path: str, limit: int) -> bytes:
        with open(path, "rb") as file:
            return file.read(limit + 1)

    def resolve(self, base: str, included: str) -> str:
        return str((Path(base) / included).resolve())

    @staticmethod
    def join(directory: str, name: str) -> str:
        return str(Path(directory) / name)


class MemoryFiles:
    """Policy files held in a mapping of relative POSIX paths to text (one virtual directory).

    Top-level files are the keys without a ``/``; ``include/x`` keys are reachable by
    ``!include``/``!include-dir`` only.
    """

    def __init__(self, files: Mapping[str, str]) -> None:
        self._files = {posixpath.normpath(name): text for name, text in files.items()}

    def list_dir(self, directory: str) -> list[str]:
        prefix = "" if directory in ("", ".") else directory.rstrip("/") + "/"
        if prefix and not self.is_dir(directory):
            raise FileNotFoundError(directory)
        return [
            key[len(prefix) :]
            for key in self._files
            if key.startswith(prefix) and "/" not in key[len(prefix) :]
        ]

    def is_file(self, path: str) -> bool:
        return path in self._files

    def is_dir(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return path in ("", ".") or any(key.startswith(prefix) for key in self._files)

    def read(self, path: str, limit: int) -> bytes:
        return self._files[path].encode("utf-8", "surrogatepass")[: limit + 1]

    def resolve(self, base: str, included: str) -> str:
        return posixpath.normpath(posixpath.join(base, included))

    @staticmethod
    def join(directory: str, name: str) -> str:
        return posixpath.join(directory, name) if directory not in ("", ".") else name


def filter_policy_names(names: Sequence[str], directory: str) -> list[str]:
    """The ``.policy`` names qrexec considers, sorted; any bad name fails the whole load.

    Raises:
        PolicySyntaxError: For a ``.policy`` name with a character outside ``[0-9a-z_.-]``.
    """
    chosen = [
        name
        for name in names
        if PurePosixPath(name).suffix == POLICY_SUFFIX and not name.startswith(".")
    ]
    for name in chosen:
        if not set(name) <= FILENAME_CHARSET:
            raise PolicySyntaxError(posixpath.join(directory, name), 0, "invalid filename")
    return sorted(chosen)


def _lines(data: bytes, path: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicySyntaxError(path, 0, f"file is not valid UTF-8: {err.reason}") from err
    # Universal newlines, as open() in text mode gives qrexec.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


class PolicyLoader:
    """Accumulates the rules of one policy load.

    Attributes:
        rules: The rules in evaluation order.
        files: Every file read, in order (top-level and included).
    """

    def __init__(
        self,
        fs: DiskFiles | MemoryFiles,
        limits: LoadLimits = DEFAULT_LIMITS,
        *,
        errors: list[PolicySyntaxError] | None = None,
    ) -> None:
        self._fs = fs
        self._limits = limits
        # When a list is given (lint), problems are collected there and loading goes on;
        # otherwise the first problem ends the load, which is what evaluation needs.
        self._errors = errors
        self._total = 0
        self._stack: list[str] = []
        self._base = ""
        self.rules: list[Rule] = []
        self.files: list[str] = []

    def _problem(self, err: PolicySyntaxError) -> None:
        if self._errors is None:
            raise err
        self._errors.append(err)

    def load_dirs(self, directories: Sequence[str]) -> None:
        """Load the top-level files of ``directories``, earlier directories winning.

        Raises:
            PolicySyntaxError: For any problem in any file.
        """
        chosen: dict[str, str] = {}
        for directory in directories:
            try:
                names = self._fs.list_dir(directory)
            except OSError as err:
                self._problem(PolicySyntaxError(directory, 0, f"cannot list directory: {err}"))
                continue
            for name in self._filter(names, directory):
                chosen.setdefault(name, directory)
        for name in sorted(chosen):
            directory = chosen[name]
            self._base = directory
            self._guarded(self._load, self._fs.join(directory, name), service=None)

    def _filter(self, names: Sequence[str], directory: str) -> list[str]:
        if self._errors is None:
            return filter_policy_names(names, directory)
        good = []
        for name in names:
            try:
                good += filter_policy_names([name], directory)
            except PolicySyntaxError as err:
                self._errors.append(err)
        return sorted(good)

    def _guarded(self, func: Callable[..., None], *args: object, **kwargs: object) -> None:
        try:
            func(*args, **kwargs)
        except PolicySyntaxError as err:
            self._problem(err)

    def _read(self, path: str, *, at: tuple[str | None, int]) -> list[str]:
        if path in self._stack:
            raise PolicySyntaxError(at[0], at[1], f"circular include of {path}")
        if len(self._stack) > self._limits.max_include_depth:
            raise PolicySyntaxError(at[0], at[1], "includes nested too deeply")
        try:
            data = self._fs.read(path, self._limits.max_file_bytes)
        except (OSError, ValueError) as err:
            raise PolicySyntaxError(path, 0, f"cannot read file: {err}") from err
        if len(data) > self._limits.max_file_bytes:
            raise PolicySyntaxError(path, 0, "file too large")
        self._total += len(data)
        if self._total > self._limits.max_total_bytes:
            raise PolicySyntaxError(path, 0, "policy too large")
        self.files.append(path)
        return _lines(data, path)

    def _load(
        self,
        path: str,
        *,
        service: tuple[str, str] | None,
        at: tuple[str | None, int] = (None, 0),
    ) -> None:
        lines = self._read(path, at=at)
        self._stack.append(path)
        try:
            for lineno, raw in enumerate(lines, start=1):
                line = raw.strip()
                if not line or line[0] == "#":
                    continue
                if service is None:
                    self._guarded(self._line, line, path, lineno)
                else:
                    self._guarded(self._service_line, line, service, path, lineno)
        finally:
            self._stack.pop()

    def _resolve(self, included: str, path: str, lineno: int) -> str:
        try:
            return self._fs.resolve(self._base, included)
        except (OSError, ValueError, RuntimeError) as err:
            # NUL bytes, symlink loops: qrexec crashes here, which also refuses everything.
            raise PolicySyntaxError(path, lineno, f"invalid include path {included!r}") from err

    def _include_file(self, included: str, path: str, lineno: int) -> str:
        resolved = self._resolve(included, path, lineno)
        if not self._fs.is_file(resolved):
            raise PolicySyntaxError(path, lineno, f"not a file: {resolved}")
        return resolved

    def _line(self, line: str, path: str, lineno: int) -> None:
        if not line.startswith("!"):
            self.rules.append(parse_rule(line, filepath=path, lineno=lineno))
            return
        directive, *params = line.split()
        want = {"!include": 1, "!include-dir": 1, "!include-service": 3, "!compat-4.0": 0}
        if directive not in want:
            raise PolicySyntaxError(path, lineno, "invalid directive")
        if len(params) != want[directive]:
            raise PolicySyntaxError(path, lineno, "invalid number of params")
        at = (path, lineno)
        if directive == "!include":
            self._load(self._include_file(params[0], path, lineno), service=None, at=at)
        elif directive == "!include-dir":
            self._include_dir(params[0], path, lineno)
        elif directive == "!include-service":
            svc, arg, included = params
            validate_service_and_argument(svc, arg, filepath=path, lineno=lineno)
            self._load(self._include_file(included, path, lineno), service=(svc, arg), at=at)
        # !compat-4.0 with no parameters: accepted, loads nothing (module docstring).

    def _include_dir(self, included: str, path: str, lineno: int) -> None:
        resolved = self._resolve(included, path, lineno)
        if not self._fs.is_dir(resolved):
            raise PolicySyntaxError(path, lineno, f"not a directory: {resolved}")
        try:
            names = self._fs.list_dir(resolved)
        except OSError as err:
            raise PolicySyntaxError(path, lineno, f"cannot list directory: {err}") from err
        for name in self._filter(names, resolved):
            self._load(self._fs.join(resolved, name), service=None, at=(path, lineno))

    def _service_line(self, line: str, service: tuple[str, str], path: str, lineno: int) -> None:
        # The compatibility rewrites qrexec applies to old-syntax files, in its order.
        line = line.replace("$include:", "!include ").replace("$", "@").replace(",", " ")
        if not line.startswith("!"):
            self.rules.append(parse_service_rule(*service, line, filepath=path, lineno=lineno))
            return
        directive, *params = line.split()
        if directive != "!include":
            raise PolicySyntaxError(path, lineno, "invalid directive")
        if len(params) != 1:
            raise PolicySyntaxError(path, lineno, "invalid number of params")
        validate_service_and_argument(*service, filepath=path, lineno=lineno)
        resolved = self._include_file(params[0], path, lineno)
        self._load(resolved, service=service, at=(path, lineno))


def load_rules(
    directories: Sequence[Path | str], limits: LoadLimits = DEFAULT_LIMITS
) -> tuple[list[Rule], list[str]]:
    """Load the policy in ``directories`` (earlier ones win on equal basenames).

    Returns:
        The rules in evaluation order and every file read.

    Raises:
        PolicySyntaxError: For any problem in any file.
    """
    loader = PolicyLoader(DiskFiles(), limits)
    loader.load_dirs([str(d) for d in directories])
    return loader.rules, loader.files


def load_texts(
    files: Mapping[str, str], limits: LoadLimits = DEFAULT_LIMITS
) -> tuple[list[Rule], list[str]]:
    """Load a policy held in memory, as if ``files`` were one policy directory.

    Returns:
        The rules in evaluation order and every file read.

    Raises:
        PolicySyntaxError: For any problem in any file.
    """
    loader = PolicyLoader(MemoryFiles(files), limits)
    loader.load_dirs([""])
    return loader.rules, loader.files


def lint_dirs(
    directories: Sequence[Path | str], limits: LoadLimits = DEFAULT_LIMITS
) -> tuple[list[Rule], list[str], list[PolicySyntaxError]]:
    """Load like :func:`load_rules`, but collect every problem instead of stopping at one.

    Returns:
        The rules that parsed, every file read, and every problem found (empty when the
        policy loads cleanly).
    """
    errors: list[PolicySyntaxError] = []
    loader = PolicyLoader(DiskFiles(), limits, errors=errors)
    loader.load_dirs([str(d) for d in directories])
    return loader.rules, loader.files, errors
