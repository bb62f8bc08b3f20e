"""What a positive evaluation returns: allow (with the resolved target) or ask (with choices).

``AllowResolution.daemon_lines`` renders exactly what qrexec's policy daemon answers for an
allowed call (QX ``AllowResolution.execute``); that is also where qrexec refuses a call from
a qube to itself ("loopback"), after evaluation. qubesd's ``admin.vm.List`` and
``admin.Events`` filters stop at evaluation, so for them a loopback allow still counts as
allow — callers that run a service must go through :meth:`AllowResolution.daemon_lines`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qubes_mcp.policy.errors import AccessDenied
from qubes_mcp.policy.rules import Rule
from qubes_mcp.policy.sysinfo import DomainInfo, SystemInfo
from qubes_mcp.policy.tokens import DISPVM_PREFIX, is_dom0


@dataclass(frozen=True, slots=True)
class AllowResolution:
    """The call is allowed, to ``target``.

    Attributes:
        target: Where the call goes: ``dom0``, a qube name or ``uuid:`` form, or
            ``@dispvm:<template>`` (a new disposable).
        user: The user to run the service as, None for the default.
        autostart: Whether qrexec may start the target.
        notify: Whether the user is notified of the allowed call.
        requested_target: The intended target after normalisation (``@default`` for an
            empty or unknown name).
        rule: The rule that decided.
        source: The calling qube.
        service: The service name.
        argument: The argument, including its ``+``.
        via_relay: True when the call came from a RemoteVM through its relay (Qubes Air's
            ``requested_source``); ``source`` is then the RemoteVM.
    """

    target: str
    user: str | None
    autostart: bool
    notify: bool
    requested_target: str
    rule: Rule
    source: str
    service: str
    argument: str
    via_relay: bool = False

    def daemon_lines(self, system_info: SystemInfo) -> list[str]:
        """The policy daemon's answer lines for this allowed call, in its order.

        Args:
            system_info: The same system information the evaluation used.

        Returns:
            ``user=…``, ``result=allow``, ``target=…``, [``target_uuid=…``],
            ``autostart=True|False``, ``requested_target=…`` [, ``service=…`` for a RemoteVM
            target] [, ``policy_source=…`` for a call relayed from a RemoteVM].

        Raises:
            AccessDenied: For a call from a qube to itself, or a target that cannot be
                looked up (qrexec fails there too, which its daemon answers as a refusal).
        """
        target = self.target
        if self.source == target:
            raise AccessDenied("loopback qrexec connection not supported")
        user_line = f"user={self.user or 'DEFAULT'}"
        tail = [f"autostart={self.autostart}", f"requested_target={self.requested_target}"]
        if is_dom0(target):
            return [user_line, "result=allow", "target=dom0", *tail]
        relayed = [f"policy_source={self.source}"] if self.via_relay else []
        if target.startswith(DISPVM_PREFIX):
            template = _lookup(system_info, target[len(DISPVM_PREFIX) :])
            uuid_line = f"target_uuid=@dispvm:uuid:{template.uuid}"
            return [user_line, "result=allow", f"target={target}", uuid_line, *tail, *relayed]
        domain = _lookup(system_info, target)
        if domain.klass != "RemoteVM":
            uuid_line = f"target_uuid=uuid:{domain.uuid}"
            return [user_line, "result=allow", f"target={target}", uuid_line, *tail, *relayed]
        # A RemoteVM is reached through its relay qube and transport service; qrexec
        # ignores user= for it.
        if not domain.relayvm:
            raise AccessDenied(f"{target}: relayvm is not set")
        if not domain.transport_rpc:
            raise AccessDenied(f"{target}: transport RPC is not set")
        relay = _lookup(system_info, domain.relayvm)
        service_line = (
            f"service={domain.transport_rpc}+{self.requested_target}+{self.service}{self.argument}"
        )
        return [
            "user=DEFAULT",
            "result=allow",
            f"target={domain.relayvm}",
            f"target_uuid=uuid:{relay.uuid}",
            *tail,
            service_line,
            *relayed,
        ]


def _lookup(system_info: SystemInfo, name: str) -> DomainInfo:
    domain = system_info.get(name)
    if domain is None:
        raise AccessDenied(f"target {name!r} does not exist")
    return domain


@dataclass(frozen=True, slots=True)
class AskResolution:
    """The user must choose; non-interactive callers treat this as deny.

    Attributes:
        targets_for_ask: The choices offered, sorted.
        default_target: The preselected choice, or None.
        user: As for :class:`AllowResolution`.
        autostart: As for :class:`AllowResolution`.
        notify: As for :class:`AllowResolution`.
        requested_target: As for :class:`AllowResolution`.
        rule: The ``ask`` rule that decided.
        source: The calling qube.
        service: The service name.
        argument: The argument, including its ``+``.
        via_relay: As for :class:`AllowResolution`.
    """

    targets_for_ask: tuple[str, ...]
    default_target: str | None
    user: str | None
    autostart: bool
    notify: bool
    requested_target: str
    rule: Rule
    source: str
    service: str
    argument: str
    via_relay: bool = False

    def allow(self, chosen: str) -> AllowResolution:
        """The resolution after the user allowed the call to ``chosen``.

        Raises:
            AccessDenied: If ``chosen`` was not offered.
        """
        if chosen not in self.targets_for_ask:
            raise AccessDenied(f"target {chosen} is not a valid choice")
        return AllowResolution(
            target=chosen,
            user=self.user,
            autostart=self.autostart,
            notify=self.notify,
            requested_target=self.requested_target,
            rule=self.rule,
            source=self.source,
            service=self.service,
            argument=self.argument,
            via_relay=self.via_relay,
        )

    def deny(self) -> AccessDenied:
        """The refusal to raise when the user says no (qrexec's message)."""
        return AccessDenied(
            f"denied by the user {self.rule.filepath}:{self.rule.lineno}", notify=self.notify
        )
