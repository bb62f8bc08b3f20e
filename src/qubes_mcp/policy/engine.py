"""Evaluating a request against a loaded policy, exactly as the qrexec policy daemon does.

Order of a decision (QX ``Request``, ``AbstractPolicy.evaluate``, ``Allow``/``Ask``/``Deny``
``.evaluate``; reference §5.5):

1. Normalise the intended target: empty → ``@default``; a name that is not a qube →
   ``@default``; ``@dispvm:Q`` needs Q to be a disposable template; ``@anyvm``, ``@tag:``,
   ``@type:``, ``*`` and unknown keywords are refused before any rule is read.
2. The first rule whose service, argument, source and target all match decides; no
   matching rule is a refusal.
3. ``deny`` refuses. ``allow`` resolves ``target=`` (or the intended target), refuses
   ``@default``, turns ``@dispvm`` into the source's ``default_dispvm`` and ``@adminvm`` into
   ``dom0``, and with ``autostart=no`` refuses a target that is not running. ``ask``
   offers ``target=`` or every target the source may reach for this call, minus itself and
   internal qubes.

A redirect is not re-checked against the policy. Loopback (a call to itself) is refused when
the answer is rendered (:meth:`AllowResolution.daemon_lines`), as in qrexec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from qubes_mcp.policy.errors import AccessDenied, PolicyError
from qubes_mcp.policy.loader import DEFAULT_LIMITS, LoadLimits, load_rules, load_texts
from qubes_mcp.policy.request import (
    allow_without_autostart,
    check_argument,
    check_request,
    normalize_target,
    relayed_source,
)
from qubes_mcp.policy.resolution import AllowResolution, AskResolution
from qubes_mcp.policy.rules import AllowAction, AskAction, Rule
from qubes_mcp.policy.sysinfo import SystemInfo
from qubes_mcp.policy.tokens import (
    DISPVM_PREFIX,
    Kind,
    dispvm_template_of,
    expand,
    is_dom0,
    matches,
    to_name,
)

# Bound on the per-service rule cache; service names come from callers.
_CACHE_MAX = 4096


class Policy:
    """A loaded qrexec policy: rules in order, and the decision function over them.

    Build it with :meth:`load` (directories) or :meth:`from_texts` (in memory). It is
    immutable and safe to share between threads.

    Attributes:
        rules: Every rule, in evaluation order.
        files: Every file read, top-level and included, in reading order.
    """

    def __init__(self, rules: Sequence[Rule], files: Sequence[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.files: tuple[str, ...] = tuple(files)
        self._by_service: dict[str, tuple[Rule, ...]] = {}

    @classmethod
    def load(cls, dirs: Sequence[Path], limits: LoadLimits = DEFAULT_LIMITS) -> Policy:
        """Load the ``.policy`` files of ``dirs``; on equal basenames the earlier dir wins.

        Pass the runtime directory first, as qrexec does (``/run/qubes/policy.d`` before
        ``/etc/qubes/policy.d``).

        Raises:
            PolicySyntaxError: For any problem in any file; the caller must deny everything.
        """
        rules, files = load_rules(dirs, limits)
        return cls(rules, files)

    @classmethod
    def from_texts(cls, files: Mapping[str, str], limits: LoadLimits = DEFAULT_LIMITS) -> Policy:
        """Load a policy held in memory, as one policy directory.

        Args:
            files: ``{name: text}``. Names without ``/`` are the directory's files (only
                valid ``*.policy`` names are loaded, sorted); names like ``include/x`` can
                be reached by ``!include*`` only.
            limits: Size caps.

        Raises:
            PolicySyntaxError: For any problem in any file.
        """
        rules, read = load_texts(files, limits)
        return cls(rules, read)

    def _rules_for(self, service: str) -> tuple[Rule, ...]:
        cached = self._by_service.get(service)
        if cached is None:
            cached = tuple(r for r in self.rules if r.service is None or r.service == service)
            if len(self._by_service) >= _CACHE_MAX:
                self._by_service.clear()
            self._by_service[service] = cached
        return cached

    def _candidates(self, service: str, argument: str, source: str, info: SystemInfo) -> list[Rule]:
        """Rules that match everything but the target, in order."""
        return [
            rule
            for rule in self._rules_for(service)
            if (rule.argument is None or rule.argument == argument)
            and matches(rule.source, source, None, source, info)
        ]

    def find_rule(
        self, *, service: str, argument: str, source: str, target: str, system_info: SystemInfo
    ) -> Rule:
        """The first rule matching the request (the target is normalised first).

        Unlike :meth:`evaluate`, the source need not exist (qrexec's ``find_matching_rule``
        does not look it up either).

        Raises:
            AccessDenied: ``no matching rule found``, or the request is invalid.
        """
        check_argument(argument)
        target_, kind = normalize_target(target, system_info)
        return self._find(service, argument, source, target=target_, kind=kind, info=system_info)

    def _find(
        self, service: str, argument: str, source: str, *, target: str, kind: Kind, info: SystemInfo
    ) -> Rule:
        for rule in self._rules_for(service):
            if (
                (rule.argument is None or rule.argument == argument)
                and matches(rule.source, source, None, source, info)
                and matches(rule.target, target, kind, source, info)
            ):
                return rule
        raise AccessDenied("no matching rule found")

    def evaluate(
        self,
        *,
        service: str,
        argument: str,
        source: str,
        target: str,
        system_info: SystemInfo,
        requested_source: str | None = None,
    ) -> AllowResolution | AskResolution:
        """Decide one call, as the qrexec policy daemon does.

        Args:
            service: The service name (without ``+``).
            argument: ``+`` or ``+ARG`` (a call without ``+`` has argument ``+``).
            source: The calling qube's name.
            target: The target as the caller wrote it (empty means ``@default``).
            system_info: The fleet.
            requested_source: For Qubes Air: the RemoteVM on whose behalf ``source`` (its
                relay qube) calls; policy is then evaluated with it as the source.

        Returns:
            An allow or ask resolution. Non-interactive callers must treat ask as deny.

        Raises:
            AccessDenied: For every refusal; ``.notify`` says whether qrexec would notify.
        """
        if requested_source:
            source = relayed_source(source, requested_source, system_info)
        check_request(argument, source, system_info)
        target_, kind = normalize_target(target, system_info)
        rule = self._find(service, argument, source, target=target_, kind=kind, info=system_info)
        action = rule.action
        if isinstance(action, AllowAction):
            return AllowResolution(
                target=self._allow_target(rule, action, source, target_, system_info),
                user=action.user,
                autostart=action.autostart,
                notify=action.notify,
                requested_target=target_,
                rule=rule,
                source=source,
                service=service,
                argument=argument,
                via_relay=bool(requested_source),
            )
        if isinstance(action, AskAction):
            targets, default = self._ask_targets(
                rule,
                action,
                service=service,
                argument=argument,
                source=source,
                info=system_info,
            )
            return AskResolution(
                targets_for_ask=targets,
                default_target=default,
                user=action.user,
                autostart=action.autostart,
                notify=action.notify,
                requested_target=target_,
                rule=rule,
                source=source,
                service=service,
                argument=argument,
                via_relay=bool(requested_source),
            )
        raise AccessDenied(f"denied by policy {rule.filepath}:{rule.lineno}", notify=action.notify)

    def allows_noninteractive(
        self, *, service: str, argument: str, source: str, target: str, system_info: SystemInfo
    ) -> bool:
        """Whether the call is allowed without asking anyone (qubesd's List/Events filter).

        ``ask`` counts as no, every refusal counts as no, and a loopback ``allow`` counts as
        yes (``qubes/ext/admin.py`` only evaluates; it never runs the call).
        """
        try:
            resolution = self.evaluate(
                service=service,
                argument=argument,
                source=source,
                target=target,
                system_info=system_info,
            )
        except PolicyError:
            return False
        return isinstance(resolution, AllowResolution)

    @staticmethod
    def _allow_target(
        rule: Rule, action: AllowAction, source: str, target: str, info: SystemInfo
    ) -> str:
        where = f"{rule.filepath}:{rule.lineno}"
        resolved, kind = normalize_target(action.target.text if action.target else target, info)
        if kind is Kind.DEFAULT:
            raise AccessDenied(
                f"policy define 'allow' action at {where} but no target is specified "
                "by caller or policy"
            )
        if kind is Kind.DISPVM:
            template = dispvm_template_of(info, source)
            if template is None:
                raise AccessDenied(
                    f"policy define 'allow' action to @dispvm at {where} "
                    "but no DispVM base is set for this VM"
                )
            resolved = template
        elif kind is Kind.ADMINVM:
            resolved = "dom0"
        if not action.autostart and not allow_without_autostart(resolved, info):
            raise AccessDenied(
                f"target {resolved} is denied because it would require autostart",
                notify=action.notify,
            )
        return resolved

    def _ask_targets(
        self,
        rule: Rule,
        action: AskAction,
        *,
        service: str,
        argument: str,
        source: str,
        info: SystemInfo,
    ) -> tuple[tuple[str, ...], str | None]:
        targets: list[str]
        if action.target is not None:
            targets = ["dom0" if is_dom0(action.target.text) else action.target.text]
        else:
            targets = sorted(self._collect(service, argument, source, info))
        if not action.autostart:
            targets = [t for t in targets if allow_without_autostart(t, info)]
        if not targets:
            raise AccessDenied(
                f"policy define 'ask' action at {rule.filepath}:{rule.lineno} but no target "
                "is available to choose from"
            )
        default: str | None = None
        if action.default_target is not None:
            default = action.default_target.text
            if action.default_target.kind is Kind.DISPVM:
                default = dispvm_template_of(info, source)
            elif is_dom0(default):
                default = "dom0"
        if default not in targets:
            default = None
        return tuple(targets), default

    def collect_targets_for_ask(
        self, *, service: str, argument: str, source: str, system_info: SystemInfo
    ) -> frozenset[str]:
        """Every target an ``ask`` for this call could offer (QX ``collect_targets_for_ask``).

        Raises:
            AccessDenied: For an invalid request, or where qrexec's computation crashes.
        """
        check_request(argument, source, system_info)
        return frozenset(self._collect(service, argument, source, system_info))

    def _collect(self, service: str, argument: str, source: str, info: SystemInfo) -> set[str]:
        targets: set[str] = set()
        # Bottom-up, so that a deny rule removes what the rules below it granted.
        for candidate in reversed(self._candidates(service, argument, source, info)):
            token = getattr(candidate.action, "target", None) or candidate.target
            expansion: set[str] = set()
            for potential in expand(token, info):
                try:
                    expansion.add(to_name(info, potential))
                except KeyError:
                    continue
            if isinstance(candidate.action, AllowAction | AskAction):
                targets |= expansion
            else:
                targets -= expansion
        if "@dispvm" in targets:
            targets.discard("@dispvm")
            template = dispvm_template_of(info, source)
            if template is not None:
                targets.add(template)
        if "@adminvm" in targets:
            targets.discard("@adminvm")
            targets.add("dom0")
        source_domain = info[source]
        targets.discard(source_domain.name)
        targets.discard(f"uuid:{source_domain.uuid}")
        for target in list(targets):
            name = target[len(DISPVM_PREFIX) :] if target.startswith(DISPVM_PREFIX) else target
            domain = info.get(name)
            if domain is None:
                raise AccessDenied(f"ask target {target!r} does not exist")
            if domain.internal:
                targets.discard(target)
        return targets
