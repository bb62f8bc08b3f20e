"""THE operations table: the single source of truth for what an agent can ask of dom0.

Each row names the qrexec service, the qube the call is addressed to (its qrexec target), the
tier it needs on that qube and on every other qube it references, whether it waits for the
operator by default, its honest MCP annotations, and the exact shape of its JSON payload. The
gate's dispatcher, its decision function, the generated qrexec policy, the MCP server's tools
and the documentation are all derived from this table; nothing else may restate it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from qubes_mcp.dom0.tiers import Tier

FieldKind = Literal[
    "qube", "new_name", "str", "int", "bool", "choice", "argv", "text", "base64", "rules", "steps"
]


class Target(Enum):
    """Where the qrexec call is addressed."""

    GLOBAL = "@adminvm"  #: about no particular qube
    QUBE = "qube"  #: about the qube named as the qrexec target (scoped by tag in policy)


@dataclass(frozen=True)
class Field:
    """One key of an operation's JSON payload."""

    name: str
    kind: FieldKind
    doc: str
    required: bool = False
    default: object = None
    choices: tuple[str, ...] = ()
    minimum: int = 0
    maximum: int = 0
    max_len: int = 256
    pattern: str = ""
    nullable: bool = False
    #: another field of the same payload that must be left empty when this one is given
    excludes: str = ""


@dataclass(frozen=True)
class Ref:
    """A qube an operation touches besides its target, and what it needs there."""

    field: str
    needs: Tier
    #: a copy may also land in the scope's dump sink (copy-in only, never enrolled)
    allow_dump: bool = False


#: the power-state predicates a precondition may ask for (``admin.vm.List``'s ``state=``, R4.3
#: ``QubesVM.get_power_state``), each with the states in which qubesd is *certain* to refuse:
#: an unknown or unread state ("") is never refused here, qubesd decides it
POWER_REFUSED: dict[str, Callable[[str], bool]] = {
    #: ``is_halted()``: anything but Halted (NA included) is refused
    "halted": lambda state: state not in ("Halted", ""),
    #: ``is_running()``: the libvirt domain is active; only a Halted qube is surely not
    "running": lambda state: state == "Halted",
    #: ``is_paused()``
    "paused": lambda state: state not in ("Paused", ""),
    #: running and not paused (``shutdown`` without force refuses a paused qube)
    "unpaused": lambda state: state in ("Halted", "Paused"),
}


@dataclass(frozen=True)
class Power:
    """A power state qubesd requires of one qube of the request before it acts.

    The gate checks it from the facts it read, before it asks the operator, so a request
    qubesd would refuse for its state is ``invalid-state`` at once, never an approval spent
    on a call that then fails (``decide._check_power``). qubesd still checks again: the
    state may change between the read and the call, and the same refusal follows.
    """

    #: ``""`` for the target, else the field that names the qube
    qube: str
    #: a key of ``POWER_REFUSED``
    state: str
    #: the refusal's message (what qubesd's refusal would mean to the agent)
    message: str
    #: ``(field, value)``: the precondition holds only when the payload has that value
    when: tuple[str, object] | None = None


@dataclass(frozen=True)
class Operation:
    name: str
    service: str
    summary: str
    target: Target
    needs: Tier
    consent: bool = False
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    fields: tuple[Field, ...] = ()
    refs: tuple[Ref, ...] = ()
    #: creates a qube: principal must be allowed to create, budgets apply, prefix applies
    creates: bool = False
    #: the gate waits on the qube for a long time (command, create, consent …)
    long_running: bool = False
    #: what the operation needs on a target the principal created itself (born by the gate
    #: for it and carrying its owner tag: ``decide.created_by``), when that is less than
    #: ``needs``; never below exec (the principal must at least be able to act on it)
    creator_needs: Tier | None = None
    #: what the agent runs can reach the network outside the machine (through the egress,
    #: when the qube is networked): the MCP ``openWorldHint``
    open_world: bool = False
    #: the power states qubesd insists on, checked before consent
    power: tuple[Power, ...] = ()

    def __post_init__(self) -> None:
        if self.creator_needs is not None and not Tier.EXEC <= self.creator_needs < self.needs:
            raise ValueError(f"{self.name}: creator_needs must be exec or more, below needs")
        for p in self.power:
            if p.state not in POWER_REFUSED:
                raise ValueError(f"{self.name}: unknown power state {p.state!r}")

    @property
    def state_changing(self) -> bool:
        return not self.read_only

    @property
    def floor(self) -> Tier:
        """The least tier the operation can need on its target, by any path (the policy lets
        a principal call it when its ceiling reaches this; the gate decides the rest)."""
        return self.needs if self.creator_needs is None else min(self.needs, self.creator_needs)


_QUBE_DOC = "a qube in your scope"
_RULE_DOC = (
    "firewall rules, first match wins; each an object with action (accept|drop) and optionally "
    "proto (tcp|udp|icmp), one of dst4/dst6/dsthost, dstports (N or N-M, tcp/udp only), "
    "icmptype (icmp only), specialtarget (dns), comment"
)
ARGV = Field(
    "command",
    "argv",
    "the command as a list of arguments (no shell)",
    required=True,
    maximum=256,
    max_len=4096,
)
STDIN = Field(
    "stdin", "text", "text fed to the command's standard input", default="", max_len=1 << 20
)
TIMEOUT = Field(
    "timeout", "int", "seconds before the command is killed", default=60, minimum=1, maximum=3600
)
STDIN_BASE64 = Field(
    "stdin_base64",
    "base64",
    "bytes fed to the command's standard input, base64-encoded (instead of stdin)",
    default="",
    max_len=1 << 20,
    excludes="stdin",
)
OUTPUT = Field(
    "output",
    "choice",
    "how stdout and stderr come back: text (UTF-8) or base64 (the exact bytes)",
    default="text",
    choices=("text", "base64"),
)
RUN_FIELDS = (ARGV, STDIN, STDIN_BASE64, OUTPUT, TIMEOUT)
#: the device classes an agent may list, attach and detach (R4.3: ``block`` in qubesd, ``usb``
#: from the USB proxy); the same rule for each: full on both ends, the operator's consent
DEVICE_CLASSES = ("block", "usb")
DEVCLASS = Field("devclass", "choice", "the device class", default="block", choices=DEVICE_CLASSES)
NOT_RUNNING = "the qube is not running"
_RUNNING = (Power("", "running", NOT_RUNNING),)
PATH = Field(
    "path",
    "str",
    "an absolute path in the qube",
    required=True,
    max_len=4096,
    pattern=r"\A/[^\x00]*\Z",
)
#: a volume revision id as R4.3's drivers name them (``1``, ``old``, ``1521065000-back``)
REVISION_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}\Z"

OPERATIONS: tuple[Operation, ...] = (
    # --- read -------------------------------------------------------------------------
    Operation(
        "qube.list",
        "qmcp.List",
        "List the qubes in your scope with your tier on each",
        Target.GLOBAL,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    Operation(
        "qube.info",
        "qmcp.Info",
        "Read a qube's allowlisted properties, scope tags, features and volumes",
        Target.QUBE,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    Operation(
        "firewall.get",
        "qmcp.FirewallGet",
        "Read a qube's firewall rules",
        Target.QUBE,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    Operation(
        "devices.list",
        "qmcp.DevicesList",
        "List the block and USB devices a qube exposes and those attached to it",
        Target.QUBE,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    Operation(
        "events.watch",
        "qmcp.Events",
        "Collect events about your qubes for a bounded window",
        Target.GLOBAL,
        Tier.READ,
        read_only=True,
        long_running=True,
        fields=(
            Field("seconds", "int", "how long to watch", default=10, minimum=1, maximum=3600),
            Field("qube", "qube", "only events about this qube", nullable=True),
        ),
        refs=(Ref("qube", Tier.READ),),
    ),
    Operation(
        "budget.get",
        "qmcp.Budget",
        "Read your pool budget and qube count",
        Target.GLOBAL,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    # --- exec: power ----------------------------------------------------------------------
    Operation(
        "qube.start",
        "qmcp.Start",
        "Start a qube (and its network chain)",
        Target.QUBE,
        Tier.EXEC,
        idempotent=True,
        long_running=True,
    ),
    Operation(
        "qube.shutdown",
        "qmcp.Shutdown",
        "Shut a qube down cleanly",
        Target.QUBE,
        Tier.EXEC,
        idempotent=True,
        long_running=True,
        fields=(
            Field("force", "bool", "shut down even if other qubes use its network", default=False),
        ),
        power=(
            *_RUNNING,
            Power("", "unpaused", "the qube is paused: unpause it first", when=("force", False)),
        ),
    ),
    Operation(
        "qube.pause",
        "qmcp.Pause",
        "Pause a running qube",
        Target.QUBE,
        Tier.EXEC,
        idempotent=True,
        power=_RUNNING,
    ),
    Operation(
        "qube.unpause",
        "qmcp.Unpause",
        "Unpause a paused qube",
        Target.QUBE,
        Tier.EXEC,
        idempotent=True,
        power=(Power("", "paused", "the qube is not paused"),),
    ),
    Operation(
        "qube.kill",
        "qmcp.Kill",
        "Kill a qube at once (unsaved state in it is lost)",
        Target.QUBE,
        Tier.EXEC,
        destructive=True,
        power=_RUNNING,
    ),
    # --- exec: commands and files ------------------------------------------------------------
    Operation(
        "qube.run",
        "qmcp.Run",
        "Run a command as root in a qube (starts it if needed)",
        Target.QUBE,
        Tier.EXEC,
        destructive=True,
        long_running=True,
        open_world=True,
        fields=RUN_FIELDS,
    ),
    Operation(
        "file.read",
        "qmcp.FileRead",
        "Read bytes of a file in a qube (base64), from offset, up to length",
        Target.QUBE,
        Tier.EXEC,
        idempotent=True,
        long_running=True,
        fields=(
            PATH,
            Field("offset", "int", "where to start, in bytes", default=0, maximum=1 << 62),
            Field(
                "length",
                "int",
                "how many bytes at most (dom0 caps it at its output limit)",
                default=1 << 20,
                minimum=1,
                maximum=1 << 30,
            ),
        ),
    ),
    Operation(
        "file.write",
        "qmcp.FileWrite",
        "Write bytes (base64) to a file in a qube: create it, overwrite it, or append to it",
        Target.QUBE,
        Tier.EXEC,
        destructive=True,
        long_running=True,
        fields=(
            PATH,
            Field("data", "base64", "the bytes, base64-encoded", required=True, max_len=1 << 20),
            Field(
                "mode",
                "choice",
                "create (refused if the file exists), overwrite, or append",
                default="create",
                choices=("create", "overwrite", "append"),
            ),
        ),
    ),
    Operation(
        "file.copy",
        "qmcp.Copy",
        "Copy files from a qube into another exec qube or into the dump sink "
        "(they land in ~/QubesIncoming/<source>/)",
        Target.QUBE,
        Tier.EXEC,
        long_running=True,
        fields=(
            Field("destination", "qube", "the receiving qube", required=True),
            Field(
                "paths",
                "argv",
                "absolute paths in the source qube",
                required=True,
                maximum=64,
                max_len=4096,
            ),
        ),
        refs=(Ref("destination", Tier.EXEC, allow_dump=True),),
    ),
    # --- net -------------------------------------------------------------------------------
    Operation(
        "firewall.set",
        "qmcp.FirewallSet",
        "Replace a qube's firewall rules",
        Target.QUBE,
        Tier.NET,
        consent=True,
        destructive=True,
        idempotent=True,
        long_running=True,
        fields=(Field("rules", "rules", _RULE_DOC, required=True, maximum=256),),
    ),
    # --- lab links: one qube reaches one TCP port of another, nothing else (decision 0018) ---
    # ``open_world`` is False: a link joins two qubes of the scope through qrexec
    # (``qubes.ConnectTCP``); it reaches nothing outside the machine.
    Operation(
        "link.open",
        "qmcp.LinkOpen",
        "Let a client qube reach one TCP port of a server qube (qubes.ConnectTCP): "
        "localhost:PORT in the client connects to 127.0.0.1:PORT in the server",
        Target.QUBE,
        Tier.NET,
        consent=True,
        idempotent=True,
        long_running=True,
        fields=(
            Field("server", "qube", "the qube whose port the client may reach", required=True),
            Field(
                "port",
                "int",
                "the TCP port on the server's 127.0.0.1, bound to the same port on the "
                "client's localhost",
                required=True,
                minimum=1,
                maximum=65535,
            ),
        ),
        refs=(Ref("server", Tier.NET),),
    ),
    Operation(
        "link.list",
        "qmcp.LinkList",
        "List the lab links you opened between qubes of your scope",
        Target.GLOBAL,
        Tier.READ,
        read_only=True,
        idempotent=True,
    ),
    Operation(
        "link.close",
        "qmcp.LinkClose",
        "Close a lab link: its policy line goes at once, then its listener in the client",
        Target.QUBE,
        Tier.EXEC,
        destructive=True,
        idempotent=True,
        long_running=True,
        fields=(
            Field("server", "qube", "the server qube of the link", required=True),
            Field("port", "int", "the link's port", required=True, minimum=1, maximum=65535),
        ),
        refs=(Ref("server", Tier.READ),),
    ),
    # --- templates: updates through the scope's egress (issue 10 §4) ----------------------
    Operation(
        "template.update",
        "qmcp.TemplateUpdate",
        "Update a template's packages through its scope's egress qube, then shut it down",
        Target.QUBE,
        Tier.EXEC,
        destructive=True,
        long_running=True,
        open_world=True,
        fields=(
            Field(
                "timeout",
                "int",
                "seconds before the update is killed",
                default=900,
                minimum=60,
                maximum=3600,
            ),
        ),
    ),
    # --- create ----------------------------------------------------------------------------
    Operation(
        "qube.create",
        "qmcp.Create",
        "Create an app qube (or a disposable template) from a template in your scope",
        Target.QUBE,
        Tier.EXEC,
        creates=True,
        long_running=True,
        fields=(
            Field("name", "new_name", "the new qube's name, inside your prefix", required=True),
            Field(
                "label",
                "choice",
                "colour label",
                default="gray",
                choices=("red", "orange", "yellow", "green", "gray", "blue", "purple", "black"),
            ),
            Field(
                "disposable_template",
                "bool",
                "make it a disposable template (template_for_dispvms)",
                default=False,
            ),
            Field(
                "private_size",
                "int",
                "private volume size in bytes",
                nullable=True,
                minimum=1,
                maximum=1 << 50,
            ),
            Field(
                "network",
                "choice",
                "inherit the documented egress, or none",
                default="inherit",
                choices=("inherit", "none"),
            ),
        ),
    ),
    Operation(
        "disposable.create",
        "qmcp.CreateDisposable",
        "Create a disposable from a disposable template in your scope",
        Target.QUBE,
        Tier.EXEC,
        creates=True,
        long_running=True,
    ),
    Operation(
        "disposable.run",
        "qmcp.RunDisposable",
        "Run one command as root in a fresh disposable, then destroy it",
        Target.QUBE,
        Tier.EXEC,
        creates=True,
        long_running=True,
        open_world=True,
        fields=RUN_FIELDS,
    ),
    Operation(
        "qube.clone",
        "qmcp.Clone",
        "Clone an app qube in your scope",
        Target.QUBE,
        Tier.FULL,
        creates=True,
        long_running=True,
        fields=(Field("name", "new_name", "the clone's name, inside your prefix", required=True),),
    ),
    # --- full ------------------------------------------------------------------------------
    Operation(
        "property.set",
        "qmcp.SetProperty",
        "Set one allowlisted property of a qube",
        Target.QUBE,
        Tier.FULL,
        idempotent=True,
        fields=(
            Field(
                "property",
                "choice",
                "the property",
                required=True,
                choices=(
                    "label",
                    "memory",
                    "maxmem",
                    "vcpus",
                    "netvm",
                    "default_dispvm",
                    "template",
                    "autostart",
                    "template_for_dispvms",
                ),
            ),
            Field(
                "value",
                "str",
                "the new value; null resets netvm-style references to none",
                required=True,
                nullable=True,
                max_len=64,
            ),
        ),
        power=(
            Power(
                "",
                "halted",
                "the qube must be halted to change its template",
                when=("property", "template"),
            ),
        ),
    ),
    Operation(
        "feature.set",
        "qmcp.SetFeature",
        "Set one allowlisted feature of a qube",
        Target.QUBE,
        Tier.FULL,
        idempotent=True,
        fields=(
            Field(
                "feature",
                "str",
                "the feature name",
                required=True,
                max_len=64,
                pattern=r"\A[a-zA-Z0-9_.-]+\Z",
            ),
            Field(
                "value",
                "str",
                "the value (printable ASCII)",
                required=True,
                max_len=1024,
                pattern=r"\A[\x20-\x7e]*\Z",
            ),
        ),
    ),
    Operation(
        "device.attach",
        "qmcp.DeviceAttach",
        "Attach a block or USB device of one of your qubes to another",
        Target.QUBE,
        Tier.FULL,
        consent=True,
        long_running=True,
        fields=(
            Field("backend", "qube", "the qube that exposes the device", required=True),
            Field(
                "device",
                "str",
                "the device's port id, e.g. sda (block) or 2-1 (usb)",
                required=True,
                max_len=64,
                pattern=r"\A[A-Za-z0-9_.-]+\Z",
            ),
            Field("read_only", "bool", "attach read-only (block devices only)", default=False),
            DEVCLASS,
        ),
        refs=(Ref("backend", Tier.FULL),),
        power=(
            Power("", "running", "the qube to attach to is not running"),
            Power("backend", "running", "the backend is not running (its devices exist only then)"),
        ),
    ),
    Operation(
        "device.detach",
        "qmcp.DeviceDetach",
        "Detach a block or USB device from a qube",
        Target.QUBE,
        Tier.FULL,
        consent=True,
        destructive=True,
        long_running=True,
        fields=(
            Field("backend", "qube", "the qube that exposes the device", required=True),
            Field(
                "device",
                "str",
                "the device's port id",
                required=True,
                max_len=64,
                pattern=r"\A[A-Za-z0-9_.-]+\Z",
            ),
            DEVCLASS,
        ),
        refs=(Ref("backend", Tier.FULL),),
        power=(
            Power("", "running", "the device is not attached there (the qube is not running)"),
            Power("backend", "running", "the device is not attached there (backend not running)"),
        ),
    ),
    Operation(
        "qube.remove",
        "qmcp.Remove",
        "Remove a halted qube and all its data",
        Target.QUBE,
        Tier.FULL,
        consent=True,
        destructive=True,
        long_running=True,
        # what a principal created it may remove again (with consent): clean up after itself
        creator_needs=Tier.EXEC,
        power=(Power("", "halted", "the qube must be halted first"),),
    ),
    # --- research loop: read a qube's console, put its private volume back -------------------
    Operation(
        "qube.log",
        "qmcp.Log",
        "Read the last lines of a qube's console log, kept by dom0 (readable after a crash)",
        Target.QUBE,
        Tier.READ,
        read_only=True,
        fields=(
            Field(
                "lines", "int", "how many of the last lines", default=100, minimum=1, maximum=2000
            ),
        ),
    ),
    Operation(
        "qube.revert",
        "qmcp.Revert",
        "Put a halted qube's private volume back to a revision kept when it last shut down "
        "(qube.info lists them, oldest first); everything written to the private volume (/rw, "
        "/home) since that revision is lost",
        Target.QUBE,
        Tier.FULL,
        consent=True,
        destructive=True,
        long_running=True,
        fields=(
            Field(
                "revision",
                "str",
                "the revision id from qube.info; null for the newest",
                nullable=True,
                max_len=64,
                pattern=REVISION_PATTERN,
            ),
        ),
        power=(Power("", "halted", "the qube must be halted before its volume is reverted"),),
    ),
    # --- plans: check a whole change first, then apply it with one approval -------------------
    Operation(
        "plan.propose",
        "qmcp.PlanPropose",
        "Check a list of steps against dom0 without doing anything, and keep them as a plan",
        Target.GLOBAL,
        Tier.READ,
        read_only=True,
        fields=(
            Field(
                "steps",
                "steps",
                "the steps in order: each {op, target, args}, op being any "
                "state-changing operation",
                required=True,
                maximum=32,
            ),
            Field(
                "title",
                "str",
                "what the plan is for, shown to the operator",
                default="",
                max_len=200,
                pattern=r"\A[\x20-\x7e]*\Z",
            ),
        ),
    ),
    Operation(
        "plan.apply",
        "qmcp.PlanApply",
        "Apply a proposed plan step by step, stopping at the first refusal; one operator "
        "approval covers every step that needs one",
        Target.GLOBAL,
        Tier.READ,
        destructive=True,
        long_running=True,
        fields=(
            Field(
                "plan_id",
                "str",
                "the id plan.propose returned",
                required=True,
                max_len=16,
                pattern=r"\A[0-9a-f]{16}\Z",
            ),
            Field(
                "digest",
                "str",
                "the digest plan.propose returned (binds what is applied to what was proposed)",
                required=True,
                max_len=16,
                pattern=r"\A[0-9a-f]{16}\Z",
            ),
        ),
    ),
)

OPERATIONS_BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}
OPERATIONS_BY_SERVICE: dict[str, Operation] = {op.service: op for op in OPERATIONS}
SERVICE_PREFIX = "qmcp."


# --- references: a property that makes one qube depend on another ------------------------------


@dataclass(frozen=True)
class Reference:
    """A VM-valued property of R4.3 (``qubes.VMProperty`` in ``qubes/vm/*.py``): the qube that
    has it (the *referencing* qube) depends on the qube it names (the *referenced* one).

    ``confers`` is what the dependency hands to whoever controls the referencing qube, over
    the referenced one. Through the referencing qube one gets at most what one has on it, so
    the referenced qube needs ``min(tier on the referencing qube, confers)``
    (:func:`reference_needs`); anything less would let the dependency carry authority the
    operator did not give.
    """

    prop: str
    confers: Tier
    why: str


REFERENCES: tuple[Reference, ...] = (
    Reference(
        "template",
        Tier.EXEC,
        "its root filesystem boots, as root, in the referencing qube: whoever runs commands "
        "there reads and runs all of it, as exec on it would allow (changes are not kept)",
    ),
    Reference(
        "default_dispvm",
        Tier.EXEC,
        "disposables started for the referencing qube run a copy of its private volume and "
        "root filesystem with commands the referencing qube chooses",
    ),
    Reference(
        "management_dispvm",
        Tier.EXEC,
        "the disposable that manages the referencing qube runs its data and root, and takes "
        "the referencing qube's answers",
    ),
    Reference(
        "netvm",
        Tier.READ,
        "it carries the referencing qube's traffic; no command, data or setting of it passes "
        "(which network a qube may use is the egress rule's business, not a tier)",
    ),
    Reference(
        "guivm",
        Tier.FULL,
        "it draws the referencing qube's windows and types into it: the operator's console",
    ),
    Reference(
        "audiovm",
        Tier.FULL,
        "it plays and records for the referencing qube: the operator's devices",
    ),
    Reference(
        "relayvm",
        Tier.FULL,
        "a remote qube's every call goes through it",
    ),
)
REFERENCES_BY_PROPERTY: dict[str, Reference] = {r.prop: r for r in REFERENCES}


def reference_needs(prop: str, referencing: Tier) -> Tier:
    """The least tier the qube named by ``prop`` must have, for a referencing qube of tier
    ``referencing``: what the dependency hands over, never more than one holds on the referencing
    qube itself."""
    return min(referencing, REFERENCES_BY_PROPERTY[prop].confers)
