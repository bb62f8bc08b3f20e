"""The operator's configuration: one TOML file, read into a frozen, typed object of limits.

Which keys exist, their defaults and their integer bounds come from one table,
``config_schema.SCHEMA``, which also generates ``docs/configuration.md``.

Only ``load_config`` touches the file system; ``parse_config`` is pure. Every mistake is a
:class:`~qubes_mcp.dom0.errors.ConfigError` naming the key, and the gate refuses every request
while the configuration is missing or malformed (fail closed). Unknown keys are mistakes too:
a misspelt ``private_cap`` must not silently mean "no cap".

Example (every key shown; only ``[[principal]]`` is required)::

    default_tier = "read"          # tier of an enrolled qube with no tier tag
    egress_qube = "ai-egress"      # default egress of principals that name none of their own

    [[principal]]
    qube = "mcp-control"           # the control qube that runs the agent
    scope = "ai"                   # tag prefix: ai-managed, ai-exec, ai-net, ai-full, ai-dump
    ceiling = "full"               # never more than this on any qube
    name_prefix = "ai-"            # qubes it creates must be named ai-…
    may_create = true
    egress_qube = "ai-egress"      # this principal's qubes reach the network only through it

    [budget]
    pool_cap = "64GiB"             # persistent footprint of all of a principal's qubes
    private_cap = "20GiB"          # largest private volume one qube may ask for
    default_private = "2GiB"
    max_qubes = 32                 # qubes in a principal's scope, at most

    [consent]
    timeout = 120                  # seconds; no answer is a refusal
    operations = ["qube.shutdown"] # needs consent on top of the operations table's defaults
    guarded = ["ai-build"]         # every state-changing request on these waits for consent
    # a desktop dialog per request (exit 0 approves, 1 denies), e.g. zenity in your session:
    dialog = ["/usr/sbin/runuser", "-u", "user", "--", "/usr/bin/env", "DISPLAY=:0",
              "/usr/bin/zenity", "--question", "--title={title}", "--text={text}"]

    [limits]
    request_bytes = 65536
    output_bytes = 1048576         # per stream of a command's output
    run_timeout = 600              # seconds, upper bound for one command
    event_window = 120             # seconds, upper bound for one events call
    concurrent_requests = 16       # requests of one calling qube acting at once
    open_requests = 64             # requests of one calling qube open at once (being received,
                                   # queued or acting); beyond: refused with "busy"
    request_read_timeout = 5       # seconds to receive a whole request (descriptor to EOF)
    rate = 20                      # requests per second per calling qube, sustained …
    burst = 100                    # … after a burst of this many; beyond: rate-limited
    refused_rate = 5               # refused requests per second per calling qube, and burst:
    refused_burst = 50             # beyond, every request of that qube is rate-limited
    copy_bytes = "1GiB"            # file.copy: content bytes of one copy, at most
    copy_files = 10000             # file.copy: files, links and directories of one copy
    log_bytes = 65536              # qube.log: bytes read from the end of a console log

    [audit]
    commands = "argv"              # what the log keeps of each command an agent runs: "argv"
                                   # (the arguments, escaped, and their SHA-256) or "hash"
                                   # (only the SHA-256 and size of the command line)
    argv_bytes = 4096              # cap on the recorded argv; beyond it: cut, marked, hashed

    [paths]
    qubesd_socket = "/var/run/qubesd.sock"
    gate_socket = "/run/qubes-mcp/gate.sock"
    operator_socket = "/run/qubes-mcp/operator.sock"
    audit_log = "/var/log/qubes-mcp/audit.log"
    state_dir = "/var/lib/qubes-mcp"   # enrolment.json (the registry of enrolled qubes) lives here
    qrexec_client = "/usr/lib/qubes/qrexec-client"  # dom0's direct line into a qube
    console_logs = "/var/log/xen/console"    # guest-NAME.log: what a qube wrote on its console
    policy_dir = "/etc/qubes/policy.d"  # where the gate re-renders its policy on (un)enrolment
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from qubes_mcp.dom0.audit.clean import ARGV_CAP_DEFAULT
from qubes_mcp.dom0.config_schema import SECTIONS, bounds, defaults, keys
from qubes_mcp.dom0.errors import ConfigError
from qubes_mcp.dom0.names import QUBE_NAME_RE, is_valid_qube_name
from qubes_mcp.dom0.tiers import Scope, Tier

DEFAULT_CONFIG_PATH = Path("/etc/qubes-mcp/config.toml")
PREFIX_RE = re.compile(r"\A[a-z][a-z0-9]{0,11}-\Z")
_SIZE_RE = re.compile(r"\A([0-9]{1,15})\s*(B|KiB|MiB|GiB|TiB)?\Z")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, None: 1}


@dataclass(frozen=True)
class Principal:
    """A control qube that runs an agent, with its scope, ceiling and name prefix."""

    qube: str
    scope: Scope
    ceiling: Tier
    name_prefix: str
    may_create: bool
    #: the one qube through which this principal's new qubes reach the network, and through
    #: which its scope's templates fetch updates: its own ``egress_qube``, else the top-level
    #: one (the default), else none (new qubes are born offline)
    egress_qube: str | None = None


@dataclass(frozen=True)
class Budget:
    pool_cap: int
    private_cap: int
    default_private: int
    max_qubes: int


@dataclass(frozen=True)
class Consent:
    timeout: int
    operations: frozenset[str]
    guarded: frozenset[str]
    #: optional desktop dialog: an argv run (no shell) for each pending request, with
    #: ``{title}`` and ``{text}`` replaced; exit 0 approves that request, exit 1 denies it
    dialog: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    request_bytes: int
    output_bytes: int
    run_timeout: int
    event_window: int
    #: per calling qube: requests acting at once (the rest of its open requests queue)
    concurrent_requests: int
    #: token buckets per calling qube (ratelimit.py): all requests, and refused ones
    rate: int = 20
    burst: int = 100
    refused_rate: int = 5
    refused_burst: int = 50
    #: one file.copy, relayed by dom0: content bytes and entries (files, links, directories)
    copy_bytes: int = 1 << 30
    copy_files: int = 10_000
    #: per calling qube: requests open at once, received, queued or acting (daemon.py)
    open_requests: int = 64
    #: seconds from connection to the request's end of input; later is a refusal
    request_read_timeout: int = 5
    #: qube.log: bytes read from the end of a console log, at most
    log_bytes: int = 65536


@dataclass(frozen=True)
class AuditSettings:
    """What the audit log records of the commands an agent runs (``[audit]``).

    ``commands = "argv"`` records each command line, escaped and capped at ``argv_bytes``
    (the SHA-256 of the whole line is always kept, so a capped argv can still be matched);
    ``"hash"`` records only the digest and size, for operators who must not keep the text.
    """

    commands: str = "argv"
    argv_bytes: int = ARGV_CAP_DEFAULT


@dataclass(frozen=True)
class Paths:
    qubesd_socket: Path
    gate_socket: Path
    operator_socket: Path
    audit_log: Path
    state_dir: Path
    qrexec_client: Path
    console_logs: Path
    policy_dir: Path


@dataclass(frozen=True)
class GateConfig:
    principals: Mapping[str, Principal]
    default_tier: Tier
    #: the top-level default; each principal carries its resolved one (``Principal.egress_qube``)
    egress_qube: str | None
    budget: Budget
    consent: Consent
    limits: Limits
    paths: Paths
    source: str = field(default="<string>", compare=False)
    audit: AuditSettings = AuditSettings()
    #: :func:`config_digest` of the file it was read from ("" when parsed from a string):
    #: ``status`` puts the running gate's beside the file's on disk
    digest: str = field(default="", compare=False)

    @property
    def egress_qubes(self) -> frozenset[str]:
        """Every principal's egress qube (the netvm of each is operator-only)."""
        return frozenset(p.egress_qube for p in self.principals.values() if p.egress_qube)

    def scope_egress(self, scope: str) -> str | None:
        """The egress of a scope: that of its principals (``parse_config`` makes them agree)."""
        for p in self.principals.values():
            if p.scope.prefix == scope:
                return p.egress_qube
        return None


DEFAULT_BUDGET = defaults("budget")
DEFAULT_CONSENT = defaults("consent")
DEFAULT_LIMITS = defaults("limits")
DEFAULT_AUDIT = defaults("audit")
AUDIT_COMMANDS = ("argv", "hash")
DEFAULT_PATHS = defaults("paths")
_PRINCIPAL = defaults("principal")
_TOPLEVEL = defaults("")
_TOP = frozenset({*keys(""), *(s for s in SECTIONS if s)})
_BOUNDS = bounds()
#: the largest copy_bytes an operator may configure (a relayed copy passes through dom0)
COPY_BYTES_MAX = 1 << 40


#: keys an earlier version accepted, and what replaced them (an upgrade's config says so)
_REMOVED: Final = {
    ("paths", "qvm_run"): "the gate reaches qubes through [paths] qrexec_client "
    "(dom0's /usr/lib/qubes/qrexec-client); delete the line",
}


def _table(data: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    raw = data.get(key, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"[{key}] must be a table")
    unknown = sorted(set(raw) - set(defaults))
    for name in unknown:
        if (key, name) in _REMOVED:
            raise ConfigError(f"[{key}]: {name!r} is no longer a setting: {_REMOVED[key, name]}")
    if unknown:
        raise ConfigError(f"[{key}]: unknown key {unknown[0]!r} (known: {', '.join(defaults)})")
    return {**defaults, **raw}


def _int(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer")
    low, high = _BOUNDS.get(where, (0, 1 << 62))
    if not low <= value <= high:
        raise ConfigError(f"{where} must be between {low} and {high}")
    return value


def parse_size(where: str, value: object) -> int:
    """An integer number of bytes, or a string like ``"20GiB"`` (binary units only)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value.strip())):
        size = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f'{where} must be bytes or a size like "20GiB"')
    if size <= 0:
        raise ConfigError(f"{where} must be positive")
    return size


def _names(where: str, value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return frozenset(value)


def _argv(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings (a command, no shell)")
    if value and not value[0].startswith("/"):
        raise ConfigError(f"{where}: the command must be an absolute path")
    return tuple(value)


def _egress(where: str, value: object) -> str | None:
    if value is not None and (
        not isinstance(value, str) or not is_valid_qube_name(value) or value == "dom0"
    ):
        raise ConfigError(f"{where}: egress_qube must be a qube name, not dom0")
    return value


def _principal(index: int, raw: object, default_egress: str | None) -> Principal:
    where = f"[[principal]] #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = set(_PRINCIPAL)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    qube = raw.get("qube")
    if not isinstance(qube, str) or not is_valid_qube_name(qube) or qube == "dom0":
        raise ConfigError(f"{where}: qube must be a qube name ({QUBE_NAME_RE.pattern}), not dom0")
    try:
        scope = Scope(str(raw.get("scope", _PRINCIPAL["scope"])))
        ceiling = Tier.parse(str(raw.get("ceiling", _PRINCIPAL["ceiling"])))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    prefix = raw.get("name_prefix", f"{scope.prefix}-")
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise ConfigError(f"{where}: name_prefix must match {PREFIX_RE.pattern}")
    may_create = raw.get("may_create", _PRINCIPAL["may_create"])
    if not isinstance(may_create, bool):
        raise ConfigError(f"{where}: may_create must be true or false")
    egress = _egress(where, raw.get("egress_qube", default_egress))
    return Principal(qube, scope, ceiling, prefix, may_create, egress)


def parse_config(text: str, source: str = "<string>") -> GateConfig:
    """Parse and check the configuration text; raises ConfigError naming the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    top = _TOP
    unknown = sorted(set(data) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(top))})")
    raw_principals = data.get("principal")
    if not isinstance(raw_principals, list) or not raw_principals:
        raise ConfigError(f"{source}: at least one [[principal]] is required")
    egress = _egress(source, data.get("egress_qube"))
    principals: dict[str, Principal] = {}
    scope_egress: dict[str, str | None] = {}
    for index, raw in enumerate(raw_principals):
        principal = _principal(index, raw, egress)
        if principal.qube in principals:
            raise ConfigError(f"{source}: principal {principal.qube!r} is configured twice")
        principals[principal.qube] = principal
        # one scope, one egress: its templates' update line and its qubes' netvm name it
        prefix = principal.scope.prefix
        if scope_egress.setdefault(prefix, principal.egress_qube) != principal.egress_qube:
            raise ConfigError(
                f"{source}: principals of scope {prefix!r} name different egress qubes "
                "(one scope has one egress; give the other principal its own scope)"
            )
    for principal in principals.values():
        if principal.egress_qube in principals or egress in principals:
            raise ConfigError(f"{source}: egress_qube cannot be a principal's control qube")
    try:
        default_tier = Tier.parse(str(data.get("default_tier", _TOPLEVEL["default_tier"])))
    except ValueError as exc:
        raise ConfigError(f"{source}: default_tier: {exc}") from None

    b = _table(data, "budget", DEFAULT_BUDGET)
    budget = Budget(
        pool_cap=parse_size("budget.pool_cap", b["pool_cap"]),
        private_cap=parse_size("budget.private_cap", b["private_cap"]),
        default_private=parse_size("budget.default_private", b["default_private"]),
        max_qubes=_int("budget.max_qubes", b["max_qubes"]),
    )
    if budget.default_private > budget.private_cap:
        raise ConfigError(f"{source}: budget.default_private is above budget.private_cap")
    c = _table(data, "consent", DEFAULT_CONSENT)
    consent = Consent(
        timeout=_int("consent.timeout", c["timeout"]),
        operations=_names("consent.operations", c["operations"]),
        guarded=_names("consent.guarded", c["guarded"]),
        dialog=_argv("consent.dialog", c["dialog"]),
    )
    from qubes_mcp.dom0.operations import OPERATIONS_BY_NAME

    for name in sorted(consent.operations - set(OPERATIONS_BY_NAME)):
        raise ConfigError(f"{source}: consent.operations: unknown operation {name!r}")
    lim = _table(data, "limits", DEFAULT_LIMITS)
    copy_bytes = parse_size("limits.copy_bytes", lim.pop("copy_bytes"))
    if copy_bytes > COPY_BYTES_MAX:
        raise ConfigError(f"{source}: limits.copy_bytes must be at most 1TiB")
    limits = Limits(**{k: _int(f"limits.{k}", v) for k, v in lim.items()}, copy_bytes=copy_bytes)
    if limits.open_requests < limits.concurrent_requests:
        raise ConfigError(f"{source}: limits.open_requests is below limits.concurrent_requests")
    p = _table(data, "paths", DEFAULT_PATHS)
    for key, value in p.items():
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"{source}: paths.{key} must be an absolute path")
    paths = Paths(**{k: Path(v) for k, v in p.items()})
    au = _table(data, "audit", DEFAULT_AUDIT)
    if au["commands"] not in AUDIT_COMMANDS:
        raise ConfigError(f'{source}: audit.commands must be "argv" or "hash"')
    audit = AuditSettings(au["commands"], _int("audit.argv_bytes", au["argv_bytes"]))
    return GateConfig(
        principals, default_tier, egress, budget, consent, limits, paths, source, audit
    )


def restart_only_changes(old: GateConfig, new: GateConfig) -> list[str]:
    """The settings a running gate cannot take on by reloading (where its sockets, log, state
    and qubesd are: it holds them open), each named as in the file, that differ."""
    return [
        f"paths.{f.name}"
        for f in fields(Paths)
        if getattr(old.paths, f.name) != getattr(new.paths, f.name)
    ]


def config_digest(raw: bytes) -> str:
    """The one digest of a configuration: SHA-256 of the file's bytes, hex."""
    return hashlib.sha256(raw).hexdigest()


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> GateConfig:
    """Read and parse the configuration file; a missing or unreadable file is a ConfigError."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration is not UTF-8") from None
    return dataclasses.replace(parse_config(text, str(path)), digest=config_digest(raw))
