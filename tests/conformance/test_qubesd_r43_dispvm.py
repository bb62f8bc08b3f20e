"""What a new disposable takes from its disposable template, fact by fact, as R4.3 does it.

Each test states one fact of qubes-core-admin ``release4.3`` and the line it comes from
(``git show release4.3:<file>``). The template is prepared the way an operator would, over
the Admin API; the disposable is then made by each creation path: ``admin.vm.CreateDisposable``
on the template (what qrexec's ``@dispvm:NAME`` calls), on dom0 with the caller's
``default_dispvm``, and ``admin.vm.Create.DispVM`` (a named disposable).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient
from tests.qubesd_fixtures import EventStream, Qubesd, demo_app, err, ok

TEMPLATE = "ai-dvm"  # demo fleet: tags ai-managed ai-exec, netvm ai-egress, purple


@pytest.fixture(name="q")
def prepared(tmp_path: Path) -> Iterator[Qubesd]:
    """The demo fleet, with ``ai-dvm`` given something of every kind to pass on."""
    q = Qubesd(demo_app(tmp_path / "root")).start()
    try:
        for prop, value in (
            ("provides_network", b"True"),
            ("memory", b"800"),
            ("kernelopts", b"nosmt"),
            ("default_user", b"researcher"),
        ):
            assert q.call(TEMPLATE, "admin.vm.property.Set", prop, value) == ok()
        assert q.call(TEMPLATE, "admin.vm.tag.Set", "operator-note") == ok()
        for feature, value in (
            ("vm-config.x", b"1"),
            ("supported-rpc.qubes.WaitForRunningSystem", b"1"),  # before preload-dispvm-max
            ("preload-dispvm-max", b"0"),
        ):
            assert q.call(TEMPLATE, "admin.vm.feature.Set", feature, value) == ok()
        rules = b"action=accept dsthost=10.1.2.3 proto=tcp dstports=443-443\naction=drop\n"
        assert q.call(TEMPLATE, "admin.vm.firewall.Set", "", rules) == ok()
        yield q
    finally:
        q.stop()


def _disposable(q: Qubesd, template: str = TEMPLATE) -> str:
    reply = q.call(template, "admin.vm.CreateDisposable")
    assert reply.startswith(b"0\0disp"), reply
    return reply[2:].decode()


def _get(q: Qubesd, vm: str, prop: str) -> bytes:
    return q.call(vm, "admin.vm.property.Get", prop)


def _lines(reply: bytes) -> list[str]:
    assert reply.startswith(b"0\0"), reply
    return reply[2:].decode().splitlines()


# --- properties: dispvm.py:381-395 -------------------------------------------------------


def test_explicit_clone_properties_are_copied_as_set_values(q: Qubesd) -> None:
    """dispvm.py:381-395: every property of the template that is marked ``clone`` and was
    set explicitly is copied (``clone_properties``) — e.g. ``provides_network`` — and reads
    as a set value (``default=False``) on the disposable."""
    disp = _disposable(q)
    assert _get(q, disp, "provides_network") == ok("default=False type=bool True")
    assert _get(q, disp, "netvm") == ok("default=False type=vm ai-egress")
    assert _get(q, disp, "memory") == ok("default=False type=int 800")
    assert _get(q, disp, "kernelopts") == ok("default=False type=str nosmt")
    assert _get(q, disp, "default_user") == ok("default=False type=str researcher")
    assert _get(q, disp, "default_dispvm") == ok("default=False type=vm ai-dvm")
    assert _get(q, disp, "label") == ok("default=False type=label purple")


def test_properties_left_at_default_stay_default(q: Qubesd) -> None:
    """dispvm.py:382-384 via ``qubes/__init__.py:812-816``: ``clone_properties`` reads the
    template's stored attribute, which a default does not have — nothing is copied."""
    disp = _disposable(q)
    assert _get(q, disp, "vcpus") == ok("default=True type=int 2")
    assert _get(q, disp, "autostart") == ok("default=True type=bool False")


def test_clone_false_properties_and_template_are_not_copied(q: Qubesd) -> None:
    """``qubes/vm/__init__.py:219-240`` (``uuid``, ``name``, ``qid``: ``clone=False``),
    dispvm.py:257-261 (``dispid``), dispvm.py:384 (``template`` left out by name)."""
    disp = _disposable(q)
    assert _get(q, disp, "template") == ok("default=False type=vm ai-dvm")
    assert _get(q, disp, "name") == ok(f"default=False type=str {disp}")
    assert _get(q, disp, "qid") != _get(q, TEMPLATE, "qid")
    assert _get(q, disp, "uuid") != _get(q, TEMPLATE, "uuid")
    assert _get(q, disp, "dispid") == ok(f"default=False type=int {disp[4:]}")
    # template_for_dispvms is an AppVM property the DispVM class does not have
    assert q.call(disp, "admin.vm.property.Get", "template_for_dispvms") == err(
        "QubesNoSuchPropertyError", f"Invalid property 'template_for_dispvms' of {disp}"
    )


def test_a_property_the_new_qube_set_is_not_overwritten(q: Qubesd) -> None:
    """dispvm.py:387-392: only properties still at their default on the new qube are
    cloned — a named disposable keeps the label it was created with."""
    reply = q.call("dom0", "admin.vm.Create.DispVM", TEMPLATE, b"name=named-disp label=green")
    assert reply == ok()
    assert _get(q, "named-disp", "label") == ok("default=False type=label green")
    assert _get(q, "named-disp", "provides_network") == ok("default=False type=bool True")
    assert _get(q, "named-disp", "auto_cleanup") == ok("default=True type=bool False")


# --- firewall, features, tags: dispvm.py:397-405 ------------------------------------------


def test_firewall_rules_are_copied(q: Qubesd) -> None:
    """dispvm.py:397: ``self.firewall.clone(template.firewall)``."""
    disp = _disposable(q)
    assert q.call(disp, "admin.vm.firewall.Get") == q.call(TEMPLATE, "admin.vm.firewall.Get")
    assert _lines(q.call(disp, "admin.vm.firewall.Get"))[-1] == "action=drop"


def test_features_are_copied_except_preload_ones(q: Qubesd) -> None:
    """dispvm.py:398-404: all features but those whose name starts with
    ``preload-dispvm``."""
    disp = _disposable(q)
    features = _lines(q.call(disp, "admin.vm.feature.List"))
    assert "vm-config.x" in features
    assert "supported-rpc.qubes.WaitForRunningSystem" in features
    assert "servicevm" in features  # set on the template by provides_network
    assert "preload-dispvm-max" not in features
    assert q.call(disp, "admin.vm.feature.Get", "vm-config.x") == ok("1")


def test_all_tags_are_copied(q: Qubesd) -> None:
    """dispvm.py:405: ``self.tags.update(template.tags)`` — every tag, the scope tags and
    the template's own ``created-by-*`` included; then admin.py:1346-1347 adds the
    caller's ``created-by-``/``disp-created-by-``."""
    template_tags = set(_lines(q.call(TEMPLATE, "admin.vm.tag.List")))
    assert {"ai-managed", "ai-exec", "operator-note"} <= template_tags
    disp = _disposable(q)
    tags = set(_lines(q.call(disp, "admin.vm.tag.List")))
    assert tags == template_tags | {"created-by-dom0", "disp-created-by-dom0"}


def test_an_inherited_created_by_tag_brings_the_creators_tags(q: Qubesd) -> None:
    """dispvm.py:405 adds each tag with ``Tags.add``, so ``ext/admin.py:188-196`` runs for an
    inherited ``created-by-X``: ``X``'s ``tag-created-vm-with`` tags are added too."""
    assert q.call(TEMPLATE, "admin.vm.tag.Set", "created-by-work") == ok()
    assert q.call("work", "admin.vm.feature.Set", "tag-created-vm-with", b"from-work") == ok()
    disp = _disposable(q)
    assert {"created-by-work", "from-work"} <= set(_lines(q.call(disp, "admin.vm.tag.List")))


def test_inheritance_happens_before_domain_add(q: Qubesd) -> None:
    """dispvm.py:380-405 run inside ``DispVM.__init__``, before ``domains.add`` fires
    ``domain-add`` (app.py:531-534), so no stream has a handler on the qube yet: the first
    events a stream sees of it are the caller's tags, after ``domain-add``."""
    stream = EventStream(q)
    try:
        disp = _disposable(q)
        last = "domain-tag-add:disp-created-by-dom0"
        stream.wait_for(lambda evs: any(e == last for _, e, _ in evs))
        own = stream.names(disp)
        assert own == ["domain-tag-add:created-by-dom0", "domain-tag-add:disp-created-by-dom0"]
        assert ("", "domain-add", {"vm": disp}) in stream.events
    finally:
        stream.close()


# --- volumes: dispvm.py:341-375, storage/__init__.py:570-584 --------------------------------


def _volume(q: Qubesd, vm: str, volume: str) -> dict[str, str]:
    info = _lines(q.call(vm, "admin.vm.volume.Info", volume))
    return dict(line.split("=", 1) for line in info)


def _app_with_second_pool(q: Qubesd) -> None:
    from qubes_mcp.sim.qubesd.app import Pool

    def add() -> None:
        q.app.pools["fast"] = Pool("fast", "file-reflink", "/var/lib/qubes-fast", 10**12)
        q.app.domains[TEMPLATE].volumes["private"].pool = "fast"
        q.app.domains[TEMPLATE].volumes["volatile"].pool = "fast"
        q.app.domains["debian-13-xfce"].volumes["root"].pool = "fast"

    q.on_loop(add)


def test_volumes_take_their_pools_from_the_template(q: Qubesd) -> None:
    """dispvm.py:355-362: ``volatile`` and ``kernel`` take the pool of the template's volume;
    storage/__init__.py:570-584: ``root`` and ``private`` (``snap_on_start``) take the pool
    of the volume they snapshot — ``root`` the TemplateVM's, ``private`` the dvm's."""
    _app_with_second_pool(q)
    disp = _disposable(q)
    assert _volume(q, disp, "private")["pool"] == "fast"
    assert _volume(q, disp, "private")["source"] == f"appvms/{TEMPLATE}/private"
    assert _volume(q, disp, "volatile")["pool"] == "fast"
    assert _volume(q, disp, "root")["pool"] == "fast"
    assert _volume(q, disp, "root")["source"] == "vm-templates/debian-13-xfce/root"
    assert _volume(q, disp, "kernel")["pool"] == "linux-kernel"


def test_volume_rw_and_a_set_ephemeral_are_copied(q: Qubesd) -> None:
    """dispvm.py:363-372: ``rw`` always, ``ephemeral`` only when the template set it."""
    assert q.call(TEMPLATE, "admin.vm.volume.Set.rw", "volatile", b"False") == ok()
    disp = _disposable(q)
    assert _volume(q, disp, "volatile")["rw"] == "False"
    assert q.call(TEMPLATE, "admin.vm.volume.Set.rw", "volatile", b"True") == ok()
    assert q.call(TEMPLATE, "admin.vm.volume.Set.ephemeral", "volatile", b"True") == ok()
    disp2 = _disposable(q)
    assert _volume(q, disp2, "volatile")["ephemeral"] == "True"
    assert _volume(q, disp2, "volatile")["rw"] == "True"


# --- every creation path -----------------------------------------------------------------


def test_default_dispvm_path_inherits(q: Qubesd) -> None:
    """admin.py:1333-1344: on dom0, the caller's ``default_dispvm`` is the template (ai-dvm's
    is itself), through the same ``DispVM.from_appvm``."""
    reply = q.call("dom0", "admin.vm.CreateDisposable", src=TEMPLATE)
    disp = reply[2:].decode()
    assert _get(q, disp, "provides_network") == ok("default=False type=bool True")
    tags = set(_lines(q.call(disp, "admin.vm.tag.List")))
    assert {"ai-managed", "ai-exec", "created-by-ai-dvm", "disp-created-by-ai-dvm"} <= tags


def test_qrexec_dispvm_path_inherits(q: Qubesd) -> None:
    """qrexec ``@dispvm:ai-dvm``: the router asks qubesd exactly as qrexec-policy-daemon
    does (``admin.vm.CreateDisposable`` on the template, payload ``uuid``)."""
    uuid = asyncio.run(QubesdClient(q.paths).create_disposable(TEMPLATE))
    assert uuid.startswith("uuid:")
    assert _get(q, uuid, "provides_network") == ok("default=False type=bool True")
    assert {"ai-managed", "ai-exec"} <= set(_lines(q.call(uuid, "admin.vm.tag.List")))


# --- refusals and preload: dispvm.py:795-804, admin.py:1323-1343 ----------------------------


def test_no_usable_default_dispvm_is_refused(q: Qubesd) -> None:
    """admin.py:1334 reads the caller's ``default_dispvm`` (None for ``ai-dump`` once
    reset); dispvm.py:799-803 refuses anything without ``template_for_dispvms``."""
    assert q.call("ai-dump", "admin.vm.property.Set", "default_dispvm", b"") == ok()
    before = q.snapshot()
    refusal = err(
        "QubesException",
        "Refusing to create disposable out of app qube which has template_for_dispvms=False",
    )
    assert q.call("dom0", "admin.vm.CreateDisposable", src="ai-dump") == refusal
    assert q.call("work", "admin.vm.CreateDisposable") == refusal
    assert q.call("debian-13-xfce", "admin.vm.CreateDisposable") == refusal
    assert q.snapshot() == before


def test_preload_without_default_dispvm_is_an_empty_reply(q: Qubesd) -> None:
    """admin.py:1339-1342: ``None.fire_event_async`` — an unhandled AttributeError."""
    assert q.call("ai-dump", "admin.vm.property.Set", "default_dispvm", b"") == ok()
    assert q.call("dom0", "admin.vm.CreateDisposable", "preload", src="ai-dump") == b""


def test_preload_needs_the_wait_for_running_system_rpc(q: Qubesd) -> None:
    """dvmtemplate.py:490-494: a template whose template chain does not announce
    ``supported-rpc.qubes.WaitForRunningSystem`` cannot preload."""
    assert q.call("default-dvm", "admin.vm.CreateDisposable", "preload") == err(
        "QubesValueError",
        "Qube does not support the RPC 'qubes.WaitForRunningSystem' but tried to preload, "
        "check if template is outdated",
    )


def test_preload_answers_empty_and_fires_the_event(q: Qubesd) -> None:
    """admin.py:1339-1343: ``domain-preload-dispvm-start`` (reason ``autostart was
    requested``) on the template, then an empty answer; no disposable is returned."""
    stream = EventStream(q)
    try:
        before = set(_lines(q.call("dom0", "admin.vm.List")))
        assert q.call(TEMPLATE, "admin.vm.CreateDisposable", "preload") == ok()
        stream.wait_for(lambda evs: any(e == "domain-preload-dispvm-start" for _, e, _ in evs))
        assert (TEMPLATE, "domain-preload-dispvm-start", {"reason": "autostart was requested"}) in (
            stream.events
        )
        assert set(_lines(q.call("dom0", "admin.vm.List"))) == before
        # a class without the DVMTemplateMixin has no handler: the same empty answer
        assert q.call("debian-13-xfce", "admin.vm.CreateDisposable", "preload") == ok()
    finally:
        stream.close()
