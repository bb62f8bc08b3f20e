"""Every key of ``config.toml``, declared once: section, name, type, default, bounds, meaning.

``config.py`` takes from this table which keys exist (anything else is an error), their
defaults and their integer bounds; ``tools/gen_config_doc.py`` writes ``docs/configuration.md``
from it. A test checks that every key here parses to its default and that the parser knows no
other key, so the reference cannot drift from what the gate accepts. The checks beyond type
and bounds (a qube name, a prefix pattern, ``default_private <= private_cap`` …) stay in
``config.py``, named in ``meaning``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qubes_mcp.dom0.audit.clean import ARGV_CAP_DEFAULT, ARGV_CAP_MAX

#: the sections, in the order of the reference; "" is the top level, "principal" the
#: array of tables ``[[principal]]``
SECTIONS = ("", "principal", "budget", "consent", "limits", "audit", "paths")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    ``kind`` is how the value is read: ``tier``, ``qube``, ``scope``, ``prefix``, ``bool``,
    ``int``, ``size`` (bytes, or a string like ``"20GiB"``), ``names`` (a list of strings),
    ``argv`` (a command: absolute path first, no shell), ``choice`` (one of the words the
    meaning names) or ``path`` (absolute).
    ``default`` is the parser's default (None: none; ``required`` says whether one is needed).
    """

    section: str
    name: str
    kind: str
    default: object
    meaning: str
    bounds: tuple[int, int] | None = None
    required: bool = False
    #: the default in words, where the parser derives it from another key
    derived: str = ""


SCHEMA: tuple[Key, ...] = (
    Key("", "default_tier", "tier", "read", "tier of an enrolled qube that has no tier tag"),
    Key(
        "",
        "egress_qube",
        "qube",
        None,
        "the default egress of every principal that names none of its own (see "
        "`[[principal]] egress_qube`); not a principal's control qube",
    ),
    Key(
        "principal",
        "qube",
        "qube",
        None,
        "the control qube that runs the agent (not dom0); each principal once",
        required=True,
    ),
    Key(
        "principal",
        "scope",
        "scope",
        "ai",
        "tag prefix of the scope: `<scope>-managed`, `-exec`, `-net`, `-full`, `-dump`",
    ),
    Key("principal", "ceiling", "tier", "full", "never more than this tier on any qube"),
    Key(
        "principal",
        "name_prefix",
        "prefix",
        None,
        "qubes it creates must be named with this prefix (lower-case letters and digits, "
        "then `-`, at most 13 characters)",
        derived='the scope and `-`, e.g. `"ai-"`',
    ),
    Key("principal", "may_create", "bool", False, "whether it may create qubes"),
    Key(
        "principal",
        "egress_qube",
        "qube",
        None,
        "the one qube through which this principal's new qubes reach the network and its "
        "scope's templates fetch updates (enrol it in the scope, with the "
        "`qubes-updates-proxy` service on); principals sharing a scope name the same one",
        derived="the top-level `egress_qube`, else none (new qubes are born offline)",
    ),
    Key(
        "budget",
        "pool_cap",
        "size",
        64 << 30,
        "persistent footprint of all of a principal's qubes, at most",
    ),
    Key(
        "budget",
        "private_cap",
        "size",
        20 << 30,
        "largest private volume one qube may ask for",
    ),
    Key(
        "budget",
        "default_private",
        "size",
        2 << 30,
        "private volume of a created qube that asks for none (at most private_cap)",
    ),
    Key(
        "budget",
        "max_qubes",
        "int",
        32,
        "qubes in a principal's scope, at most",
        (1, 10000),
    ),
    Key("consent", "timeout", "int", 120, "seconds; no answer is a refusal", (5, 3600)),
    Key(
        "consent",
        "operations",
        "names",
        [],
        "operations that need consent on top of the operations table's defaults",
    ),
    Key(
        "consent",
        "guarded",
        "names",
        [],
        "qubes on which every state-changing request waits for consent",
    ),
    Key(
        "consent",
        "dialog",
        "argv",
        [],
        "a desktop dialog run for each pending request, {title} and {text} replaced; "
        "exit 0 approves, 1 denies",
    ),
    Key(
        "limits",
        "request_bytes",
        "int",
        65536,
        "largest request accepted",
        (1024, 1 << 20),
    ),
    Key(
        "limits",
        "output_bytes",
        "int",
        1 << 20,
        "per stream of a command's output",
        (1024, 64 << 20),
    ),
    Key(
        "limits",
        "run_timeout",
        "int",
        600,
        "seconds, upper bound for one command",
        (1, 24 * 3600),
    ),
    Key(
        "limits",
        "event_window",
        "int",
        120,
        "seconds, upper bound for one events call",
        (1, 3600),
    ),
    Key(
        "limits",
        "concurrent_requests",
        "int",
        16,
        "requests of one calling qube acting at once",
        (1, 256),
    ),
    Key(
        "limits",
        "rate",
        "int",
        20,
        "requests per second per calling qube, sustained",
        (1, 100_000),
    ),
    Key(
        "limits",
        "burst",
        "int",
        100,
        "… after a burst of this many; beyond: rate-limited",
        (1, 1_000_000),
    ),
    Key(
        "limits",
        "refused_rate",
        "int",
        5,
        "refused requests per second per calling qube, sustained",
        (1, 100_000),
    ),
    Key(
        "limits",
        "refused_burst",
        "int",
        50,
        "… and burst; beyond, every request of that qube is rate-limited",
        (1, 1_000_000),
    ),
    Key(
        "limits",
        "copy_bytes",
        "size",
        1 << 30,
        "file.copy: content bytes of one copy, at most (at most 1TiB)",
    ),
    Key(
        "limits",
        "copy_files",
        "int",
        10_000,
        "file.copy: files, links and directories of one copy",
        (1, 1_000_000),
    ),
    Key(
        "limits",
        "open_requests",
        "int",
        64,
        "requests of one calling qube open at once (received, queued or acting); beyond: "
        "refused busy; at least concurrent_requests",
        (1, 1024),
    ),
    Key(
        "limits",
        "request_read_timeout",
        "int",
        5,
        "seconds to receive a whole request (descriptor to end of input)",
        (1, 60),
    ),
    Key(
        "limits",
        "log_bytes",
        "int",
        65536,
        "qube.log: bytes read from the end of a console log, at most",
        (1024, 1 << 20),
    ),
    Key(
        "audit",
        "commands",
        "choice",
        "argv",
        'what the log keeps of a command an agent runs: "argv" (each argument escaped, '
        'bounded by argv_bytes) or "hash" (only its SHA-256 and size)',
    ),
    Key(
        "audit",
        "argv_bytes",
        "int",
        ARGV_CAP_DEFAULT,
        "bound of a recorded argv, in bytes of its JSON text; beyond it the argv is cut and "
        "marked (its digest is always kept)",
        (256, ARGV_CAP_MAX),
    ),
    Key("paths", "qubesd_socket", "path", "/var/run/qubesd.sock", "qubesd's Admin API socket"),
    Key("paths", "gate_socket", "path", "/run/qubes-mcp/gate.sock", "the gate's qrexec socket"),
    Key(
        "paths",
        "operator_socket",
        "path",
        "/run/qubes-mcp/operator.sock",
        "the operator's socket (pending, approve, deny)",
    ),
    Key("paths", "audit_log", "path", "/var/log/qubes-mcp/audit.log", "the audit log"),
    Key(
        "paths",
        "state_dir",
        "path",
        "/var/lib/qubes-mcp",
        "enrolment.json (the registry of enrolled qubes) lives here",
    ),
    Key(
        "paths",
        "qrexec_client",
        "path",
        "/usr/lib/qubes/qrexec-client",
        "dom0's direct line into a qube (commands and copies)",
    ),
    Key(
        "paths",
        "console_logs",
        "path",
        "/var/log/xen/console",
        "where dom0 keeps each qube's console log (guest-NAME.log)",
    ),
    Key(
        "paths",
        "policy_dir",
        "path",
        "/etc/qubes/policy.d",
        "where the generated policy is written on install and (un)enrolment",
    ),
)


def keys(section: str) -> tuple[str, ...]:
    """The names of ``section``'s keys, in the table's order."""
    return tuple(k.name for k in SCHEMA if k.section == section)


def defaults(section: str) -> dict[str, object]:
    """``section``'s keys with their defaults (a fresh dict, fresh lists, each call)."""
    return {
        k.name: (list(k.default) if isinstance(k.default, list) else k.default)
        for k in SCHEMA
        if k.section == section
    }


def bounds() -> Mapping[str, tuple[int, int]]:
    """Integer bounds by ``section.name``."""
    return {f"{k.section}.{k.name}": k.bounds for k in SCHEMA if k.bounds is not None}
