"""Parameter types shared by the tools: the schema an agent sees for each argument.

They restate the gate's field constraints (``operations.json``) so that clients can validate
before calling; a test compares every tool's JSON schema with the table. The server enforcing
them is a convenience, not a control: the gate checks every payload again.
"""

from __future__ import annotations

from typing import Annotated, Literal, NotRequired

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

#: qubesd's qube-name rule (``$`` without multiline matches only at the end, so no "dom0\n")
QUBE_NAME_PATTERN = r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}$"
FEATURE_PATTERN = r"^[a-zA-Z0-9_.-]+$"
PRINTABLE_PATTERN = r"^[\x20-\x7e]*$"
DEVICE_PATTERN = r"^[A-Za-z0-9_.-]+$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$"


def qube_param(description: str) -> object:
    """The ``Field`` of an argument that names an existing qube. The agent takes such names
    from qube_list, so the schema adds no rule to them; the gate checks every name."""
    return Field(description=description or None)


def new_name_param(description: str) -> object:
    """The ``Field`` of a name the agent invents for a new qube: qubesd's naming rule."""
    return Field(pattern=QUBE_NAME_PATTERN, max_length=31, description=description)


Qube = Annotated[str, qube_param("")]
Command = Annotated[
    list[Annotated[str, Field(max_length=4096)]],
    Field(
        min_length=1,
        max_length=256,
        description="argv (no shell)",
    ),
]
Stdin = Annotated[str, Field(max_length=1 << 20, description=None)]
Timeout = Annotated[int, Field(ge=1, le=3600, description="seconds")]
StdinBase64 = Annotated[
    str,
    Field(max_length=1 << 20, description="or as base64"),
]
Output = Annotated[
    Literal["text", "base64"],
    Field(description=None),
]
Path = Annotated[str, Field(max_length=4096, pattern=r"^/[^\x00]*$", description=None)]
Label = Literal["red", "orange", "yellow", "green", "gray", "blue", "purple", "black"]
PropertyName = Literal[
    "label",
    "memory",
    "maxmem",
    "vcpus",
    "netvm",
    "default_dispvm",
    "template",
    "autostart",
    "template_for_dispvms",
]


# One firewall rule; the first rule that matches a packet decides. (A comment, not a
# docstring: pydantic would repeat a docstring in the tool listing.)
class FirewallRule(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    action: Literal["accept", "drop"]
    proto: NotRequired[Literal["tcp", "udp", "icmp"]]
    dst4: NotRequired[Annotated[str, Field(max_length=64, description="IP[/prefix]")]]
    dst6: NotRequired[Annotated[str, Field(max_length=64, description=None)]]
    dsthost: NotRequired[Annotated[str, Field(max_length=255)]]
    dstports: NotRequired[Annotated[int | str, Field(description="N or N-M")]]
    icmptype: NotRequired[Annotated[int, Field(ge=0, le=255, description="icmp only")]]
    specialtarget: NotRequired[Literal["dns"]]
    comment: NotRequired[Annotated[str, Field(max_length=256)]]
