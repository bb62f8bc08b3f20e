"""What an agent may see of a qube it may read: allowlists, and references kept in scope.

Nothing here is a denylist of names. Properties, features and events are shown only when they
are on an allowlist; a property that names another qube shows that name only when that qube
is in the principal's scope, and ``OUT_OF_SCOPE`` otherwise. Agent-writable text (feature
values, device descriptions) is never compared with host qube names, so what the agent sees
back cannot tell it whether some name exists (the prior art's redaction oracle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from qubes_mcp.dom0.facts import QubeFacts
from qubes_mcp.dom0.tiers import Scope, Tier

OUT_OF_SCOPE = "<out-of-scope>"

#: properties an agent may read (qid is left out: its allocation hints at how many qubes exist)
INFO_PROPERTIES = (
    "label",
    "template",
    "netvm",
    "default_dispvm",
    "provides_network",
    "template_for_dispvms",
    "memory",
    "maxmem",
    "vcpus",
    "virt_mode",
    "autostart",
    "include_in_backups",
    "uuid",
)
VM_VALUED = frozenset({"template", "netvm", "default_dispvm"})
_BOOL = frozenset({"provides_network", "template_for_dispvms", "autostart", "include_in_backups"})
_INT = frozenset({"memory", "maxmem", "vcpus"})

#: features an agent may read: what it may write, and what a qube's template reports about itself
READABLE_FEATURE_PREFIXES = ("service.", "vm-config.", "supported-service.", "supported-feature.")
READABLE_FEATURES = frozenset(
    {"os", "os-distribution", "os-version", "os-eol", "qrexec", "gui", "vmexec"}
)
_FEATURE_VALUE_MAX = 256

#: events an agent may see about its own qubes (names without the ``:suffix``)
VISIBLE_EVENTS = frozenset(
    {
        "domain-start",
        "domain-start-failed",
        "domain-shutdown",
        "domain-paused",
        "domain-unpaused",
        "domain-add",
        "domain-delete",
        "firewall-changed",
        "device-attach:block",
        "device-detach:block",
    }
)


def visible_tags(scope: Scope, tags: frozenset[str], registered: str | None) -> list[str]:
    """Only the enrolment tag: tiers, owners, guards and operator tags stay in dom0."""
    return [scope.managed] if scope.is_enrolled(tags, registered) else []


def readable_feature(name: str) -> bool:
    return name in READABLE_FEATURES or name.startswith(READABLE_FEATURE_PREFIXES)


def features_view(features: Mapping[str, str]) -> dict[str, str]:
    return {k: v[:_FEATURE_VALUE_MAX] for k, v in sorted(features.items()) if readable_feature(k)}


def property_value(name: str, raw: str, in_scope: Callable[[str], bool]) -> object:
    if name in VM_VALUED:
        if not raw:
            return None
        return raw if in_scope(raw) else OUT_OF_SCOPE
    if name in _BOOL:
        return raw == "True"
    if name in _INT:
        return int(raw) if raw.isdigit() else None
    return raw


def summary(q: QubeFacts, tier: Tier) -> dict[str, object]:
    return {"name": q.name, "class": _klass(q), "state": q.state, "tier": tier.word}


def _klass(q: QubeFacts) -> str:
    """Agents see the disposable template as its own kind, like the Qubes tools do."""
    if q.klass == "AppVM" and q.flag("template_for_dispvms"):
        return "DispVMTemplate"
    return q.klass


def info(
    q: QubeFacts,
    tier: Tier,
    scope: Scope,
    features: Mapping[str, str],
    in_scope: Callable[[str], bool],
    *,
    revisions: list[str] | None = None,
    resources: Mapping[str, int] | None = None,
) -> dict[str, object]:
    """What ``qube.info`` shows: allowlisted properties, visible tags and features, the
    private volume (its size, and the revisions ``qube.revert`` can put back when they could
    be read) and, for a running qube, its memory and CPU figures."""
    private: dict[str, object] = {"size": q.private_size}
    if revisions is not None:
        private["revisions"] = list(revisions)
    view: dict[str, object] = {
        **summary(q, tier),
        "properties": {
            name: property_value(name, q.prop(name), in_scope)
            for name in INFO_PROPERTIES
            if name in q.props
        },
        "tags": visible_tags(scope, q.tags, q.registered),
        "features": features_view(features),
        "volumes": {"private": private},
    }
    if resources:
        view["resources"] = dict(resources)
    return view


def event_view(
    subject: str, event: str, kwargs: Mapping[str, str], scope: Scope
) -> dict[str, object] | None:
    """An event as the agent may see it, or None. Only its name and subject travel."""
    base, _, suffix = event.partition(":")
    if event in VISIBLE_EVENTS or base in ("domain-start", "domain-shutdown"):
        return {"event": event, "subject": subject}
    if base in ("domain-tag-add", "domain-tag-delete"):
        # the tier lives in the tag; only enrolment changes are visible
        return {"event": event, "subject": subject} if suffix == scope.managed else None
    if base in ("property-set", "property-reset") and suffix in INFO_PROPERTIES:
        return {"event": event, "subject": subject}  # which property, never the value
    if base in ("domain-feature-set", "domain-feature-delete") and readable_feature(suffix):
        return {"event": event, "subject": subject}
    return None
