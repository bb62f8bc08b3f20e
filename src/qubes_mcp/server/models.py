"""The structured results of the tools, as the gate returns them (its JSON reply's ``result``).

TypedDicts give each tool an output schema an agent can plan with. They describe, they do not
defend: the gate in dom0 already redacted everything here (an out-of-scope reference reads
``<out-of-scope>``). ``NotRequired`` marks keys the gate includes only sometimes.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

QubeSummary = TypedDict(
    "QubeSummary",
    {
        "name": str,
        "class": str,  # AppVM, DispVMTemplate, DispVM, TemplateVM, StandaloneVM …
        "state": str,
        "tier": str,  # read | exec | net | full: your tier on this qube
    },
)


class QubeList(TypedDict):
    principal: str
    ceiling: str
    name_prefix: str
    may_create: bool
    #: seconds dom0 waits for the operator before refusing
    consent_timeout: NotRequired[int]
    qubes: list[QubeSummary]
    #: qubes you may copy files into (file_copy) but not see or touch otherwise
    dump_sinks: NotRequired[list[str]]


QubeInfo = TypedDict(
    "QubeInfo",
    {
        "name": str,
        "class": str,
        "state": str,
        "tier": str,
        "properties": dict[str, Any],
        "tags": list[str],
        "features": dict[str, str],
        #: private: its size and the revisions qube_revert can put back, oldest first
        "volumes": dict[str, dict[str, Any]],
        #: a running qube's memory now and at most (KiB) and CPU time (ns)
        "resources": NotRequired[dict[str, int]],
    },
)


class FirewallRules(TypedDict):
    qube: str
    rules: list[dict[str, Any]]


class Devices(TypedDict):
    qube: str
    exposed: list[dict[str, str]]  # each with its devclass: block | usb
    attached: list[dict[str, str]]


class Event(TypedDict):
    event: str
    subject: str
    ts: float


class Events(TypedDict):
    seconds: int
    events: list[Event]
    truncated: bool


class Budget(TypedDict):
    pool_used: int
    pool_cap: int
    pool_free: int
    private_cap: int
    qubes: int
    max_qubes: int


class PowerState(TypedDict):
    qube: str
    state: str


class CommandResult(TypedDict):
    qube: str
    exit_code: int | None  # None when the command was killed by its timeout
    stdout: NotRequired[str]  # output="text"
    stderr: NotRequired[str]
    stdout_base64: NotRequired[str]  # output="base64"
    stderr_base64: NotRequired[str]
    truncated: bool
    timed_out: bool


class PackageChange(TypedDict):
    name: str
    version: str


PackageUpgrade = TypedDict("PackageUpgrade", {"name": str, "from": str, "to": str})


class TemplateUpdateResult(TypedDict):
    template: str
    manager: str  # apt | dnf
    exit_code: int | None  # the update's; None when its timeout killed it
    timed_out: bool
    packages: int  # installed after the update
    state: str  # the template's power state after (Halted)
    upgraded: list[PackageUpgrade]  # at most 200 each; the *_count keys are whole
    upgraded_count: int
    installed: list[PackageChange]
    installed_count: int
    removed: list[PackageChange]
    removed_count: int
    log_tail: str  # the end of the package manager's own output


class FileReadResult(TypedDict):
    qube: str
    path: str
    offset: int
    length: int
    file_size: int | None
    eof: bool
    sha256: str
    data: str  # base64


class FileWriteResult(TypedDict):
    qube: str
    path: str
    mode: str
    written: int
    sha256: str


class DisposableCommandResult(CommandResult):
    disposable: str


class CopyResult(TypedDict):
    source: str
    destination: str
    paths: list[str]
    copied: bool
    files: int  # files, links and directories that landed
    bytes: int  # content bytes that landed
    landed_in: str


class FirewallSetResult(TypedDict):
    qube: str
    rules: int


class Link(TypedDict):
    id: str
    client: str  # where localhost:PORT leads to the server
    server: str  # whose 127.0.0.1:PORT the client reaches
    port: int
    opened_at: NotRequired[str]


class LinkOpenResult(TypedDict):
    link: Link
    listening: str  # "localhost:PORT in CLIENT"


class LinkList(TypedDict):
    links: list[Link]


class LinkCloseResult(TypedDict):
    closed: Link
    #: the listener in the client was stopped (false when the client was not running)
    listener_stopped: bool


NewQube = TypedDict(
    "NewQube",
    {
        "name": str,
        "class": str,
        "tier": str,
        "netvm": str | None,
        "source": str,
        "label": str,
    },
)


class PropertySetResult(TypedDict):
    qube: str
    property: str
    value: str | None


class FeatureSetResult(TypedDict):
    qube: str
    feature: str
    value: str


class DeviceAttachResult(TypedDict):
    frontend: str
    backend: str
    device: str
    devclass: str  # block | usb
    read_only: NotRequired[bool]


class RemoveResult(TypedDict):
    qube: str
    removed: bool


class LogResult(TypedDict):
    qube: str
    #: the last lines of the console log, non-printable bytes escaped as \\xNN
    lines: list[str]
    #: older output exists that is not shown
    truncated: bool


class RevertResult(TypedDict):
    qube: str
    volume: str
    revision: str


class PlanStep(TypedDict):
    """One step of a plan: any state-changing tool's operation, its qube, its arguments."""

    op: str
    target: str | None
    args: dict[str, Any]


class StepError(TypedDict):
    code: str
    message: str


# dom0's decision on one proposed step: ``allowed`` (decided on the fleet as it is),
# ``deferred`` (about a qube an earlier step creates: decided as that qube will be born, and
# again when it runs) or ``refused`` (``error`` says why; the plan is not kept). ``consent``:
# the step waits for the operator (one approval covers the plan). Comments, not docstrings:
# pydantic would repeat a docstring in the output schema of every listing.
class StepVerdict(TypedDict):
    decision: Literal["allowed", "deferred", "refused"]
    consent: bool
    error: StepError | None


class PlanStepVerdict(TypedDict):
    index: int
    op: str
    target: str | None
    verdict: StepVerdict


# one applied step: its result, or the refusal that stopped the plan there
class PlanStepReport(TypedDict):
    index: int
    op: str
    target: str | None
    result: NotRequired[dict[str, Any]]
    error: NotRequired[StepError]


class PlanProposal(TypedDict):
    plan_id: str | None
    digest: str | None
    steps: list[PlanStepVerdict]
    needs_consent: bool
    expires_in: NotRequired[int]


class PlanResult(TypedDict):
    plan_id: str
    steps: list[PlanStepReport]
    completed: int
    stopped_at: int | None
