"""``qubes-mcp-admin`` subcommands of the gate: run it, install it, answer it, check it.

    gate                         run the gate daemon in the foreground
    install / uninstall / status [--json] / doctor / reload   [--root DIR]
    policy render | explain [--from QUBE]
    pending | show ID | approve ID [--digest D] | deny ID
    audit verify | recover | checkpoint | show [--log PATH]
    enrol QUBE [--tier T | --dump] | unenrol QUBE | tier QUBE read|exec|net|full|none
                                 [--scope ai]   (enrolment is by name: decision record 0010)

``--config`` (default /etc/qubes-mcp/config.toml) names the configuration; with ``--root``
(every operator subcommand takes it) the default becomes ROOT/etc/qubes-mcp/config.toml, so the
same commands drive an emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from qubes_mcp.dom0.admin import AdminClient, QubesdError
from qubes_mcp.dom0.audit.acts import audited, sudo_uid
from qubes_mcp.dom0.config import DEFAULT_CONFIG_PATH, GateConfig, load_config
from qubes_mcp.dom0.describe import escape
from qubes_mcp.dom0.errors import GateError
from qubes_mcp.dom0.operator.install import Layout
from qubes_mcp.dom0.tiers import Scope, Tier
from qubes_mcp.policy import PolicyError


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    root = Path(getattr(args, "root", None) or "/")
    return Layout(root).config if root != Path("/") else DEFAULT_CONFIG_PATH


def _config(args: argparse.Namespace) -> GateConfig:
    return load_config(_config_path(args))


def _fail(message: str) -> int:
    print(f"qubes-mcp-admin: error: {message}", file=sys.stderr)
    return 1


def _fail_gate(exc: GateError) -> int:
    """The operator sees the whole reason (file and line of a policy that does not parse)."""
    from qubes_mcp.dom0.enrolment import PolicyRefusedError

    if isinstance(exc, PolicyRefusedError):
        return _fail(f"{exc}: {exc.reason}")
    return _fail(str(exc))


def cmd_gate(args: argparse.Namespace) -> int:
    import logging

    from qubes_mcp.dom0.broken_config import load_for_gate
    from qubes_mcp.dom0.daemon import run_gate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # a broken configuration does not stop the gate: it refuses everything (decision 0011)
    config = load_for_gate(_config_path(args))
    ready = Path(args.ready_file) if args.ready_file else None
    return run_gate(config, ready, _config_path(args))


@audited(_config, "install")
def cmd_install(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.install import install

    try:
        for line in install(
            Path(args.root), principal=args.principal, egress=args.egress, exe=args.exe
        ):
            print(line)
    except GateError as exc:
        return _fail_gate(exc)
    except (PolicyError, OSError) as exc:  # say what; nothing more was changed
        return _fail(f"{type(exc).__name__}: {exc}")
    # what was installed takes effect now: a running gate reloads (or says why it cannot)
    return _reload(
        args, none_running="no gate is running: it reads the configuration when it starts"
    )


def _reload(args: argparse.Namespace, *, none_running: str | None) -> int:
    """Ask the running gate to reload and print what it did; non-zero when it kept the
    configuration it had. With no gate to ask: print ``none_running`` (exit 0), or fail
    when that is None."""
    try:
        answer = _operator(args, {"cmd": "reload", "sudo_uid": sudo_uid()})
    except (OSError, ValueError):
        if none_running is None:
            return _fail(
                "no gate is running: nothing to reload (it reads the configuration when it starts)"
            )
        print(none_running)
        return 0
    if "result" not in answer:
        return _fail(str(answer.get("error", answer)))
    was = "unchanged" if answer["running"] == answer["previous"] else f"was {answer['previous']}"
    print(f"the running gate reloaded its configuration: sha256 {answer['running']} ({was})")
    if answer.get("policy_current") is False:
        from qubes_mcp.dom0.daemon import POLICY_NOT_CURRENT

        print(f"warning: {POLICY_NOT_CURRENT}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """``reload``: the running gate reads its configuration again (it records the act)."""
    return _reload(args, none_running=None)


def cmd_uninstall(args: argparse.Namespace) -> int:
    """``uninstall``: nothing to remove is said, and changes nothing (not even the log)."""
    from qubes_mcp.dom0.operator.install import installed_files

    if not installed_files(Path(args.root), purge=args.purge):
        print("nothing installed")
        return 0
    return _uninstall(args)


@audited(_config, "uninstall")
def _uninstall(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.install import uninstall

    for line in uninstall(Path(args.root), purge=args.purge):
        print(line)
    return 0


def gate_report(args: argparse.Namespace) -> dict[str, Any]:
    """What the running gate says about itself, from one ``status`` on its operator socket
    (so "serving" means it answered, not that a socket file exists): its mode, its request
    path and log (``Gate.status``), the digest of the configuration it runs beside the one
    on disk, and the requests waiting for consent."""
    from qubes_mcp.dom0.config import config_digest

    try:
        disk: str | None = config_digest(_config_path(args).read_bytes())
    except OSError:
        disk = None
    report: dict[str, Any] = {"config_sha256": disk}
    try:
        answer = _operator(args, {"cmd": "status"})
    except (GateError, OSError, ValueError):
        return {**report, "gate": "not running"}
    if answer.get("mode") == "refuse-all":
        return {**report, "gate": "refuse-all", "gate_config_error": answer["config_error"]}
    running = answer.get("config_sha256")
    pending = answer.get("pending", [])
    return {
        **report,
        "gate": str(answer.get("mode", "running")),
        "gate_status": answer.get("status", {}),
        "running_config_sha256": running,
        "config_current": running == disk,
        "pending": {"count": len(pending), "ids": pending},
    }


def _audit_seq(args: argparse.Namespace) -> int | None:
    """The sequence number of the last record in the audit log (its head file), if any."""
    from qubes_mcp.dom0.audit.files import ReadCounter, read_anchor
    from qubes_mcp.dom0.broken_config import fallback_paths

    try:
        log = _config(args).paths.audit_log
    except GateError:
        log = fallback_paths(_config_path(args)).audit_log
    try:
        anchor = read_anchor(log, ReadCounter())
    except (GateError, OSError):
        return None
    return None if anchor is None else anchor.seq


def _status_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in report.items():
        if key == "gate":
            if value == "not running":
                lines.append("gate: not running (its operator socket does not answer)")
            elif value == "refuse-all":
                why = report["gate_config_error"]
                lines.append(
                    f"gate: refusing every request: the configuration does not load: {why}"
                )
            else:
                lines.append(f"gate: {value}")
        elif key == "gate_status":
            lines += [f"gate {k}: {v}" for k, v in value.items()]
        elif key == "pending":
            ids = ", ".join(value["ids"])
            lines.append(f"pending: {value['count']}" + (f" ({ids})" if ids else ""))
        elif key != "gate_config_error":
            lines.append(f"{key}: {value}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.install import status

    code = 0
    report: dict[str, Any] = {}
    try:
        report.update(status(Path(args.root)))
    except GateError as exc:
        report["config"] = f"error: {exc}"
        code = 1
    report.update(gate_report(args))
    report["audit_seq"] = _audit_seq(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(*_status_lines(report), sep="\n")
    return code


def cmd_doctor(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.doctor import doctor

    findings = asyncio.run(doctor(Path(args.root), _config_path(args)))
    for finding in findings:
        print(finding)
    if not findings:
        print("ok: no findings")
    return 1 if any(f.severity == "error" for f in findings) else 0


def cmd_render(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.enrolment import Registry, registry_path
    from qubes_mcp.dom0.render import validated_policy

    try:
        config = _config(args)
        registry = Registry.load(registry_path(config.paths.state_dir))
        sys.stdout.write(validated_policy(config, registry))
    except GateError as exc:
        return _fail(str(exc))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.explain import explain

    try:
        config = _config(args)
        print(asyncio.run(explain(config, Layout(Path(args.root)), args.source)))
    except GateError as exc:
        return _fail(str(exc))
    return 0


def _operator(args: argparse.Namespace, command: dict[str, Any]) -> dict[str, Any]:
    from qubes_mcp.dom0.broken_config import fallback_paths
    from qubes_mcp.dom0.daemon import operator_call

    try:
        socket = _config(args).paths.operator_socket
    except GateError:  # a gate in refuse-all mode still answers where the config says
        socket = fallback_paths(_config_path(args)).operator_socket
    return asyncio.run(operator_call(socket, command))


def format_request(item: dict[str, Any], *, whole: bool = False) -> list[str]:
    """How one waiting request is printed: the CLI's own header line, the request's lines as
    the gate built them (agent values escaped there, so none holds a line break; each is
    indented), then the CLI's own ``why:`` line. ``whole`` prints the whole request instead of
    the consent view (``show``)."""
    lines = [
        f"[{item['id']}] {item['principal']} asks: {item['op']} on {item['target']} "
        f"({item['seconds_left']}s left; digest {item['digest']})"
    ]
    body = str(item["request"] if whole else item["description"])
    lines += [f"    {line}" for line in body.split("\n")]
    lines.append(f"    why: {'; '.join(str(r) for r in item['reasons'])}")
    return lines


def cmd_pending(args: argparse.Namespace) -> int:
    try:
        answer = _operator(args, {"cmd": "pending"})
    except (GateError, OSError) as exc:
        return _fail(f"the gate is not reachable ({type(exc).__name__})")
    if "config_error" in answer:
        return _fail(
            "the gate is running but refuses every request: the configuration does not load: "
            f"{answer['config_error']}"
        )
    pending = answer["pending"]
    if args.json:
        print(json.dumps(pending, indent=2))
        return 0
    if not pending:
        print("nothing is waiting for you")
    for item in pending:
        for line in format_request(item):
            print(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        answer = _operator(args, {"cmd": "show", "id": args.id})
    except (GateError, OSError) as exc:
        return _fail(f"the gate is not reachable ({type(exc).__name__})")
    request = answer.get("request")
    if not isinstance(request, dict):
        return _fail(f"no pending request {escape(args.id)}")
    if args.json:
        print(json.dumps(request, indent=2))
        return 0
    for line in format_request(request, whole=True):
        print(line)
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    approve = args.answer == "approve"
    try:
        digest = args.digest
        if approve and not digest:  # bind the answer to the request as it stands now
            pending = _operator(args, {"cmd": "pending"})["pending"]
            match = [p for p in pending if p["id"] == args.id]
            if match:
                digest = match[0]["digest"]
                print("approving:")
                for line in format_request(match[0])[1:-1]:
                    print(line)
            # not pending: the gate says why (withdrawn, timed-out, already-answered, unknown)
        command = {
            "cmd": args.answer,
            "id": args.id,
            "digest": digest or "",
            "sudo_uid": sudo_uid(),
        }
        answer = _operator(args, command)
    except (GateError, OSError) as exc:
        return _fail(f"the gate is not reachable ({type(exc).__name__})")
    result = answer.get("result", answer.get("error"))
    print(result)
    return 0 if result in ("approved", "denied") else 1


def _log_path(args: argparse.Namespace) -> Path:
    return Path(args.log) if args.log else _config(args).paths.audit_log


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.audit.verify import audit_verify_main

    checkpoint = None
    if args.checkpoint:
        seq, _, digest = args.checkpoint.partition(":")
        if not seq.isdigit() or not digest:
            return _fail("--checkpoint must be SEQ:HASH (as verify printed it)")
        checkpoint = (int(seq), digest)
    try:
        return audit_verify_main(_log_path(args), sys.stdout, checkpoint=checkpoint)
    except GateError as exc:
        return _fail(str(exc))


def cmd_audit_show(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.audit.show import audit_show_main, describe_filters

    try:
        filters = describe_filters(vars(args))
        path = _log_path(args)
    except (GateError, ValueError) as exc:
        return _fail(str(exc))
    return audit_show_main(path, sys.stdout, filters, as_json=args.json, follow=args.follow)


def _seq_hash(text: str) -> tuple[int, str] | None:
    seq, _, digest = text.partition(":")
    return (int(seq), digest) if seq.isdigit() and digest else None


def cmd_audit_checkpoint(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.audit_cli import audit_checkpoint_main

    through = None
    if args.through:
        through = _seq_hash(args.through)
        if through is None:
            return _fail("--through must be SEQ:HASH (as verify printed it)")
    try:
        return audit_checkpoint_main(
            _log_path(args), sys.stdout, through=through, reason=args.reason
        )
    except GateError as exc:
        return _fail(str(exc))


def cmd_audit_recover(args: argparse.Namespace) -> int:
    from qubes_mcp.dom0.operator.audit_cli import audit_recover_main

    try:
        return audit_recover_main(
            _log_path(args), sys.stdout, reason=args.reason, accept_loss=args.accept_loss
        )
    except GateError as exc:
        return _fail(str(exc))


async def _set_tags(client: AdminClient, qube: str, add: set[str], remove: set[str]) -> None:
    have = set(await client.lines(qube, "admin.vm.tag.List"))
    for tag in sorted(remove & have):
        await client.call(qube, "admin.vm.tag.Remove", tag)
    for tag in sorted(add - have):
        await client.call(qube, "admin.vm.tag.Set", tag)


async def _enrol(config: GateConfig, qube: str, scope: Scope, tier: str, dump: bool) -> str:
    """Register ``qube`` by name (under its uuid) and give it the scope's tags."""
    from qubes_mcp.dom0.enrolment import (
        Registry,
        enrol_live,
        live_identity,
        lost_links,
        registry_path,
    )
    from qubes_mcp.dom0.tiers import DUMP, MEMBER

    if qube == "dom0":
        raise ValueError("refusing to enrol dom0")
    if qube in config.principals:
        raise ValueError(f"refusing to enrol {qube}: it is a principal's control qube")
    client = AdminClient(config.paths.qubesd_socket)
    if await live_identity(client, qube) is None:
        raise ValueError(f"no such qube: {qube}")
    tier_tags = {t for t in (scope.tier_tag(x) for x in Tier) if t}
    if dump:
        add, remove = {scope.dump}, {scope.managed, *tier_tags}
    else:
        tag = scope.tier_tag(Tier.parse(tier))
        add = {scope.managed} | ({tag} if tag else set())
        remove = (tier_tags - add) | {scope.dump}
    # a link needs net on both ends (link.open): below net, the qube's links close with it
    # (read before the tags change: a running gate may close them first, on the tag event)
    below_net = dump or Tier.parse(tier) < Tier.NET
    before = Registry.load(registry_path(config.paths.state_dir))
    # tags first: if the registration then fails, the qube is tagged but not registered,
    # which the gate treats as out of scope (and doctor reports)
    await _set_tags(client, qube, add, remove)
    after = await enrol_live(
        config,
        client,
        scope,
        qube,
        by="operator",
        role=DUMP if dump else MEMBER,
        close_links=below_net,
    )
    closed = "".join(
        f"; lab link {k.id} closed"
        for k in lost_links(before, after)
        if qube in (k.client, k.server)
    )
    role = "dump sink" if dump else f"tier {tier}"
    return (
        f"{qube}: enrolled in {scope.prefix} ({role}); tags +{sorted(add)} -{sorted(remove)}"
        + closed
    )


async def _unenrol(config: GateConfig, qube: str, scope: Scope) -> str:
    """Unregister first (out of scope at once), then remove the scope's enrolment tags. The
    qube's lab links close in the same commit (decision 0018); the line names them."""
    from qubes_mcp.dom0.enrolment import Registry, lost_links, registry_path, unenrol_name

    before = Registry.load(registry_path(config.paths.state_dir))
    after = await unenrol_name(config, scope, qube)
    closed = "".join(f"; lab link {k.id} closed" for k in lost_links(before, after))
    tier_tags = {t for t in (scope.tier_tag(x) for x in Tier) if t}
    remove = {scope.managed, scope.dump, *tier_tags}
    client = AdminClient(config.paths.qubesd_socket)
    try:
        await _set_tags(client, qube, set(), remove)
    except QubesdError as exc:
        if exc.exc_class not in ("QubesVMNotFoundError", "QubesValueError"):
            raise
        return f"{qube}: unenrolled from {scope.prefix} (the qube no longer exists){closed}"
    return f"{qube}: unenrolled from {scope.prefix}; tags -{sorted(remove)}{closed}"


@audited(_config)  # tier, enrol, unenrol
def cmd_tier(args: argparse.Namespace) -> int:
    """``enrol``, ``unenrol`` and ``tier`` (which enrols at that tier; ``none`` unenrols)."""
    try:
        config = _config(args)
        scope = Scope(args.scope)
        if args.command == "unenrol" or getattr(args, "tier", None) == "none":
            line = asyncio.run(_unenrol(config, args.qube, scope))
        else:
            tier = args.tier or "read"
            line = asyncio.run(_enrol(config, args.qube, scope, tier, getattr(args, "dump", False)))
    except GateError as exc:
        return _fail_gate(exc)
    except ValueError as exc:
        return _fail(str(exc))
    print(line)
    return 0


def register(sub: Any, policy_sub: Any | None = None) -> None:
    """Add the gate's subcommands to ``qubes-mcp-admin``."""

    def add(name: str, func: Any, help_text: str, *, root: bool = False) -> Any:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="configuration file (default: /etc/qubes-mcp/config.toml)")
        if root:
            p.add_argument("--root", default="/", help="install root (an emulator's root)")
        p.set_defaults(func=func)
        return p

    gate = add("gate", cmd_gate, "run the gate daemon in the foreground")
    gate.add_argument("--ready-file", help=argparse.SUPPRESS)
    inst = add("install", cmd_install, "install config, policy, service links, unit", root=True)
    inst.add_argument(
        "--principal", help="control qube to put in a new config (default: mcp-control)"
    )
    inst.add_argument("--egress", help="egress qube to put in a new config")
    inst.add_argument("--exe", default="/usr/bin/qubes-mcp-admin", help=argparse.SUPPRESS)
    un = add("uninstall", cmd_uninstall, "remove what install wrote", root=True)
    un.add_argument("--purge", action="store_true", help="also remove config and audit log")
    st = add("status", cmd_status, "show what is installed and what the gate runs", root=True)
    st.add_argument("--json", action="store_true")
    add("reload", cmd_reload, "make the running gate read its configuration again", root=True)
    add("doctor", cmd_doctor, "find misconfigurations in config, files and fleet", root=True)
    pending = add("pending", cmd_pending, "list requests waiting for your consent", root=True)
    pending.add_argument("--json", action="store_true")
    show = add("show", cmd_show, "print the whole of a pending request, escaped", root=True)
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    for answer in ("approve", "deny"):
        p = add(answer, cmd_answer, f"{answer} a pending request", root=True)
        p.add_argument("id")
        p.add_argument("--digest", help="the digest `pending` showed (binds the answer)")
        p.set_defaults(answer=answer)
    audit = sub.add_parser("audit", help="the tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the whole hash chain")
    verify.add_argument("--config")
    verify.add_argument("--log", help="log file (default: from the configuration)")
    verify.add_argument(
        "--checkpoint",
        help="SEQ:HASH printed by an earlier verify, kept "
        "off this machine: also catches a consistent rewrite",
    )
    verify.set_defaults(func=cmd_audit_verify)
    recover = audit_sub.add_parser(
        "recover",
        help="repair a crash-torn tail (refuses on tampering); the repair is itself recorded",
    )
    recover.add_argument("--config")
    recover.add_argument("--log", help="log file (default: from the configuration)")
    recover.add_argument("--reason", default="", help="why, for the record")
    recover.add_argument(
        "--accept-loss",
        action="store_true",
        help="also cut a torn line that was the anchored record (verify says when); "
        "the lost record's seq and hash are recorded",
    )
    recover.set_defaults(func=cmd_audit_recover)
    checkpoint = audit_sub.add_parser(
        "checkpoint",
        help="record that the log is backed up (through its head, or SEQ:HASH): rotation "
        "never deletes records after the last checkpoint",
    )
    checkpoint.add_argument("--config")
    checkpoint.add_argument("--log", help="log file (default: from the configuration)")
    checkpoint.add_argument("--through", help="SEQ:HASH printed by `verify` before the backup")
    checkpoint.add_argument("--reason", default="", help="where the copy went, for the record")
    checkpoint.set_defaults(func=cmd_audit_checkpoint)
    show = audit_sub.add_parser(
        "show", help="the log as a timeline, one line per request, verified as it is read"
    )
    show.add_argument("--config")
    show.add_argument("--log", help="log file (default: from the configuration)")
    show.add_argument("--since", help="from this time (ISO 8601, UTC) or seq:N on")
    show.add_argument("--until", help="up to this time or seq:N")
    show.add_argument("--principal", help="only this principal (a shell pattern)")
    show.add_argument("--qube", help="only requests naming this qube (a shell pattern)")
    show.add_argument("--op", help="only this operation (a shell pattern, e.g. 'operator.*')")
    show.add_argument("--outcome", help="only ok, failed, rolled-back, not-run or refused")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.add_argument("--follow", action="store_true", help="keep printing new requests")
    show.set_defaults(func=cmd_audit_show)
    tier = add("tier", cmd_tier, "enrol a qube at a tier (none = unenrol)", root=True)
    tier.add_argument("qube")
    tier.add_argument("tier", choices=("read", "exec", "net", "full", "none"))
    enrol = add(
        "enrol", cmd_tier, "enrol a qube by name in a scope (registers and tags it)", root=True
    )
    enrol.add_argument("qube")
    how = enrol.add_mutually_exclusive_group()
    how.add_argument("--tier", choices=("read", "exec", "net", "full"), default=None)
    how.add_argument("--dump", action="store_true", help="as the scope's copy-in-only sink")
    unenrol = add("unenrol", cmd_tier, "unregister a qube and remove its scope tags", root=True)
    unenrol.add_argument("qube")
    for p in (tier, *(sub.choices[n] for n in ("enrol", "unenrol"))):
        p.add_argument("--scope", default="ai")
    if policy_sub is not None:
        render = policy_sub.add_parser("render", help="print the generated policy")
        render.add_argument("--config")
        render.add_argument("--root", default="/")
        render.set_defaults(func=cmd_render)
        explain = policy_sub.add_parser("explain", help="show who may call what")
        explain.add_argument("--config")
        explain.add_argument("--root", default="/")
        explain.add_argument("--from", dest="source", help="only this calling qube")
        explain.set_defaults(func=cmd_explain)
