"""Every allow line the renderer can produce is oracle-free and keyed on names, not tags.

Rendered for many configurations (one and three principals, every ceiling, ``may_create`` on
and off, with and without an egress qube) and registries (members, dumps, templates, gate-born
disposables), each line is parsed and checked against the rules of decision record 0010 and
issue 7 section 1:

- no allow line has a target token that can match a name the caller cannot see: never
  ``@anyvm``, ``*``, ``@dispvm…`` or ``@tag:``; ``@default`` and ``@type:`` only as the complete
  oracle-free set (``render.ANY_NON_DOM0``) for the same service, source and action;
- no line is keyed on a tag or type as its source (inherited tags must open nothing);
- no ``qubes.Filecopy`` line at all; ``qubes.SyncAppMenus`` and ``qubes.UpdatesProxy`` only
  from registered templates (the latter only operator-enrolled ones, to the egress qube).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict

import pytest

from qubes_mcp.dom0.config import GateConfig, parse_config
from qubes_mcp.dom0.enrolment import Registry, new_link
from qubes_mcp.dom0.render import ANY_NON_DOM0, render_policy, validated_policy
from qubes_mcp.policy import Policy

PRINCIPAL = """
[[principal]]
qube = "{qube}"
scope = "{scope}"
ceiling = "{ceiling}"
name_prefix = "{prefix}-"
may_create = {create}
"""


def _config(principals: list[tuple[str, str, str, bool]], egress: bool | str) -> GateConfig:
    """``egress``: none, the top-level ``ai-egress`` for all, or ``"per-scope"``: the default
    and, for every scope but ``ai``, the principal's own ``<scope>-egress``."""
    text = 'default_tier = "read"\n' + ('egress_qube = "ai-egress"\n' if egress else "")
    for qube, scope, ceiling, create in principals:
        text += PRINCIPAL.format(
            qube=qube, scope=scope, ceiling=ceiling, prefix=scope, create=str(create).lower()
        )
        if egress == "per-scope" and scope != "ai":
            text += f'egress_qube = "{scope}-egress"\n'
    return parse_config(text)


def _registry(scopes: list[str]) -> Registry:
    r = Registry()
    for scope in scopes:
        for name, klass, role, by in [
            (f"{scope}-dev", "AppVM", "member", "operator"),
            (f"{scope}-dvm", "AppVM", "member", "operator"),
            (f"{scope}-tpl", "TemplateVM", "member", "operator"),
            (f"{scope}-notes", "AppVM", "dump", "operator"),
            (f"{scope}-disp1", "DispVM", "member", "gate:x"),
            (f"{scope}-clone", "AppVM", "member", "gate:x"),
        ]:
            r = r.enrolled(scope, name, f"uuid-{name}", klass, role=role, by=by)
    return r.enrolled("ai", "ai-egress", "uuid-egress", "AppVM", by="operator")


ONE = [("mcp-control", "ai", "full", True)]
THREE = [
    ("mcp-control", "ai", "full", True),
    ("auditor", "ai", "read", False),
    ("lab-control", "lab", "exec", True),
]
CASES = [
    (principals, egress, scopes)
    for principals, egress, scopes in itertools.product(
        [ONE, THREE, [("solo", "ai", "net", False)]],
        [True, False, "per-scope"],
        [[], ["ai"], ["ai", "lab"]],
    )
]


def _lines(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", "!"))]


def _forbidden_target(token: str) -> bool:
    return token in ("@anyvm", "*") or token.startswith(("@dispvm", "@tag:"))


@pytest.mark.parametrize(("principals", "egress", "scopes"), CASES)
def test_every_allow_line_is_oracle_free_and_keyed_on_names(
    principals: list[tuple[str, str, str, bool]], egress: bool | str, scopes: list[str]
) -> None:
    config = _config(principals, egress)
    registry = _registry(scopes)
    text = validated_policy(config, registry)
    wildcards: dict[tuple[str, ...], set[str]] = defaultdict(set)
    known_sources = set(config.principals) | {
        n for s in registry.scopes() for n in registry.entries(s)
    }
    for cols in _lines(text):
        service, _arg, source, target, action, *params = cols
        assert source in known_sources, f"source must be a registered name: {cols}"
        assert service != "qubes.Filecopy", cols
        if action != "allow":
            assert action == "deny", cols  # never ask: a dialog could reveal a name
            continue
        redirect = [p for p in params if p.startswith("target=")]
        for token in [target, *(p.removeprefix("target=") for p in redirect)]:
            assert not _forbidden_target(token), f"oracle target: {cols}"
        if target == "@default" or target.startswith("@type:"):
            wildcards[(service, _arg, source, *params)].add(target)
        if service in ("qubes.SyncAppMenus", "qubes.UpdatesProxy"):
            entries = [(s, registry.entry(s, source)) for s in registry.scopes()]
            scope, entry = next(((s, e) for s, e in entries if e is not None), ("", None))
            assert entry is not None and entry.klass == "TemplateVM", cols
            if service == "qubes.UpdatesProxy":
                # to the egress of the template's own scope, never another's
                expected = "ai-egress" if scope == "ai" or egress is True else f"{scope}-egress"
                assert config.scope_egress(scope) == expected, cols
                assert entry.by == "operator" and redirect == [f"target={expected}"], cols
    for key, targets in wildcards.items():
        assert targets == set(ANY_NON_DOM0), f"incomplete any-but-dom0 set for {key}: {targets}"


def test_the_any_but_dom0_set_covers_every_class_the_engine_knows() -> None:
    from qubes_mcp.dom0.render import NON_DOM0_CLASSES

    # the qubes-core-admin classes (setup.py qubes.vm entry points) minus AdminVM, + RemoteVM
    assert set(NON_DOM0_CLASSES) == {"AppVM", "DispVM", "TemplateVM", "StandaloneVM", "RemoteVM"}


def test_1000_registered_qubes_render_and_parse_in_reasonable_time() -> None:
    """The gate re-renders on every enrolment change; the router reloads what changed."""
    config = _config(THREE, True)
    r = Registry()
    for i in range(1000):
        r = r.enrolled("ai", f"ai-q{i}", f"uuid-{i}", "AppVM", by="gate:mcp-control")
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        text = render_policy(config, r)
        Policy.from_texts({"25-qubes-mcp.policy": text})
        samples.append(time.perf_counter() - start)
    assert len(text.splitlines()) > 1000
    # generous on a shared 2-core machine; measured about 0.5 s alone (see the report)
    assert sorted(samples)[1] < 10.0


def test_the_any_but_dom0_set_answers_every_existing_and_missing_name_alike() -> None:
    """The claim render.ANY_NON_DOM0 rests on (reference §5.3/§5.5), checked with the engine:
    every existing non-dom0 qube of every class, by name or uuid, and every missing name are
    allowed alike; dom0 and every @dispvm form are not matched at all."""
    from qubes_mcp.policy import AccessDenied, AllowResolution, SystemInfo

    rules = "\n".join(f"svc.X * src {t} allow target=@adminvm" for t in ANY_NON_DOM0)
    policy = Policy.from_texts({"30-x.policy": rules + "\nsvc.X * src @anyvm deny\n"})
    domains: dict[str, dict[str, object]] = {
        "dom0": {"type": "AdminVM", "uuid": "00000000-0000-0000-0000-000000000000"},
        "src": {"type": "AppVM"},
    }
    classes = ["AppVM", "DispVM", "TemplateVM", "StandaloneVM"]
    for i, klass in enumerate(classes):
        domains[f"q-{klass.lower()}"] = {
            "type": klass,
            "uuid": f"{i + 1:08d}-0000-4000-8000-{0:012d}",
        }
    domains["q-dvm"] = {
        "type": "AppVM",
        "template_for_dispvms": True,
        "uuid": "99999999-0000-4000-8000-000000000000",
    }
    domains["q-remote"] = {"type": "RemoteVM", "relayvm": "src", "transport_rpc": "qubesair.X"}
    info = SystemInfo.from_json({"domains": domains})

    def verdict(target: str) -> str:
        try:
            res = policy.evaluate(
                service="svc.X", argument="+", source="src", target=target, system_info=info
            )
        except AccessDenied:
            return "deny"
        return "allow" if isinstance(res, AllowResolution) else "ask"

    allowed = [n for n in domains if n not in ("dom0", "src")]
    allowed += [f"uuid:{d['uuid']}" for n, d in domains.items() if "uuid" in d and n != "dom0"]
    allowed += ["no-such-qube", "@default", "", "uuid:12345678-0000-4000-8000-000000000000"]
    for target in allowed:
        assert verdict(target) == "allow", target
    for target in ["dom0", "@adminvm", "@dispvm", "@dispvm:q-dvm", "@dispvm:no-such", "@anyvm"]:
        assert verdict(target) == "deny", target


def _linked(registry: Registry) -> Registry:
    """Two lab links per scope: dev → clone (8080) and clone → disp1 (22)."""
    for scope in registry.scopes():
        if f"{scope}-dev" not in registry.members(scope):
            continue  # only the egress is registered
        for client, server, port in (("dev", "clone", 8080), ("clone", "disp1", 22)):
            link = new_link(scope, f"{scope}-{client}", f"{scope}-{server}", port, by="gate:x")
            registry = registry.linked(link)
    return registry


@pytest.mark.parametrize(("principals", "egress", "scopes"), CASES)
def test_lab_links_are_the_only_sandbox_to_sandbox_lines_and_name_both_qubes(
    principals: list[tuple[str, str, str, bool]], egress: bool, scopes: list[str]
) -> None:
    """Decision 0018: a link renders one line naming both registered qubes and the port;
    every other allow line from a sandbox qube still goes to dom0 (or the egress, for a
    template's updates) and nowhere else."""
    config = _config(principals, egress)
    registry = _linked(_registry(scopes))
    text = validated_policy(config, registry)
    members = {s: set(registry.members(s)) for s in registry.scopes()}
    sandbox = {n for s in registry.scopes() for n in registry.entries(s)}
    rendered_scopes = {p.scope.prefix for p in config.principals.values()}
    expected = {
        ("qubes.ConnectTCP", f"+{k.port}", k.client, k.server)
        for k in registry.links()
        if k.scope in rendered_scopes
    }
    found = set()
    for cols in _lines(text):
        service, arg, source, target, action, *params = cols
        if source not in sandbox or action != "allow":
            continue
        if service == "qubes.ConnectTCP":
            assert params == [] and arg.removeprefix("+").isdigit(), cols
            scope = next(s for s in members if source in members[s])
            assert source in members[scope] and target in members[scope], cols
            assert source != target, cols
            found.add((service, arg, source, target))
            continue
        redirect = [p.removeprefix("target=") for p in params if p.startswith("target=")]
        egresses = [[p.egress_qube] for p in config.principals.values() if p.egress_qube]
        assert target == "@adminvm" or redirect in (["@adminvm"], *egresses), cols
    assert found == expected
