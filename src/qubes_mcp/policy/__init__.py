"""The qrexec policy language (Qubes R4.3): parse, validate and evaluate, standard library only.

One grammar for every use: the engine that decides calls in the emulator is the one that
validates a generated policy file before it is written, lints a directory, and explains a
decision. Entry points:

- :meth:`Policy.load` / :meth:`Policy.from_texts` — parse (raises :class:`PolicySyntaxError`);
- :meth:`Policy.evaluate` — decide one call (raises :class:`AccessDenied`, or returns an
  :class:`AllowResolution` / :class:`AskResolution`);
- :class:`SystemInfo` — the fleet facts, from ``internal.GetSystemInfo`` JSON.

Every failure is a :class:`PolicyError`; there is no path that allows by default.
"""

from qubes_mcp.policy.engine import Policy
from qubes_mcp.policy.errors import AccessDenied, PolicyError, PolicySyntaxError, SystemInfoError
from qubes_mcp.policy.loader import LoadLimits
from qubes_mcp.policy.request import normalize_target
from qubes_mcp.policy.resolution import AllowResolution, AskResolution
from qubes_mcp.policy.rules import AllowAction, AskAction, DenyAction, Rule
from qubes_mcp.policy.sysinfo import DomainInfo, SystemInfo

__all__ = [
    "AccessDenied",
    "AllowAction",
    "AllowResolution",
    "AskAction",
    "AskResolution",
    "DenyAction",
    "DomainInfo",
    "LoadLimits",
    "Policy",
    "PolicyError",
    "PolicySyntaxError",
    "Rule",
    "SystemInfo",
    "SystemInfoError",
    "normalize_target",
]
