"""Disposables as R4.3 makes them: what a new DispVM takes from its disposable template.

R4.3 ``qubes/vm/dispvm.py`` ``DispVM.__init__`` runs for every new disposable, named
(``admin.vm.Create.DispVM``) or not (``admin.vm.CreateDisposable``, qrexec's ``@dispvm:``).
In its order, after ``QubesVM.__init__`` has enabled events and fired ``domain-init``:

1. the volumes take their configuration from the template's live volumes: ``pool``, ``rw``,
   and ``ephemeral`` when the template set it; ``root`` and ``private`` (``snap_on_start``)
   take the pool of the volume they snapshot (``qubes/storage/__init__.py``
   ``_update_volume_config_source``);
2. every property the template set explicitly and that is marked ``clone`` (all but
   ``name``, ``qid``, ``uuid``, ``dispid``), except ``template``, unless the new qube set
   it already — copied as ``clone_properties`` does, without setter or events;
3. the firewall rules (``Firewall.clone``);
4. the features, except those whose name starts with ``preload-dispvm``;
5. **all** tags (``Tags.update``, one ``domain-tag-add`` each, so ``created-by-X`` brings
   ``X``'s ``tag-created-vm-with`` tags too).

All of this happens before ``domain-add``: no ``admin.Events`` stream has a handler on the
new qube yet, so streams see none of these events (the extensions' reactions still run).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qubes_mcp.sim import exc
from qubes_mcp.sim.firewall import Firewall
from qubes_mcp.sim.qubesd.vm import Qube, Volume

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.app import QubesApp

log = logging.getLogger("qubes_mcp.sim.qubesd")

#: ``DispVM.__init__`` leaves ``template`` out by name; the rest is ``clone=False`` in R4.3.
_NOT_FROM_TEMPLATE = frozenset({"template"})
#: feature prefix ``DispVM.__init__`` does not copy
_PRELOAD_PREFIX = "preload-dispvm"


def check_template(template: Qube) -> None:
    """``DispVM.__init__``: only a qube with ``template_for_dispvms`` (an AppVM or a
    StandaloneVM; others have no such property) can be a disposable's template."""
    if not (template.has_prop("template_for_dispvms") and template.get("template_for_dispvms")):
        raise exc.QubesValueError(
            f"template for disposable ({template.name}) needs to be an AppVM with "
            "template_for_dispvms=True"
        )


def check_can_generate(appvm: Qube | None) -> Qube:
    """``DispVM.can_gen_disposable``: ``getattr(appvm, "template_for_dispvms", False)``,
    so no usable template (``None`` included) is the same refusal."""
    if appvm is None or not (
        appvm.has_prop("template_for_dispvms") and appvm.get("template_for_dispvms", False)
    ):
        raise exc.QubesException(
            "Refusing to create disposable out of app qube which has template_for_dispvms=False"
        )
    return appvm


def _snapshot_pool(template: Qube, name: str) -> str | None:
    """The pool ``_update_volume_config_source`` ends on: follow ``source`` up the chain."""
    holder: Qube | None = template
    pool: str | None = None
    while holder is not None:
        vol = holder.volumes.get(name)
        if vol is None:
            return pool
        pool = vol.pool
        if not vol.snap_on_start:
            break
        holder = holder.template_or_none()
    return pool


def take_volumes(volumes: dict[str, Volume], template: Qube) -> None:
    """Step 1: ``pool``, ``rw`` and an explicit ``ephemeral`` from the template's volumes."""
    for name, vol in volumes.items():
        src = template.volumes.get(name)
        if src is None:
            continue
        pool = _snapshot_pool(template, name) if vol.snap_on_start else src.pool
        if pool is not None:
            vol.pool = pool
        vol.rw = src.rw
        if src.ephemeral is not None:
            vol.ephemeral = src.ephemeral


def inherit(app: QubesApp, vm: Qube, template: Qube) -> None:
    """Steps 2 to 5, on a DispVM not yet in ``app.domains``."""
    for name, value in template.props.items():
        prop = vm.defs.get(name)
        if prop is None or not prop.clone or name in _NOT_FROM_TEMPLATE or name in vm.props:
            continue
        vm.props[name] = value
    vm.firewall = Firewall(template.firewall.rules)
    for feature, value in list(template.features.items()):
        if not feature.startswith(_PRELOAD_PREFIX):
            app.set_feature(vm, feature, value)
    for tag in list(template.tags):
        app.add_tag(vm, tag)


#: classes with R4.3's ``DVMTemplateMixin`` (the ``domain-preload-dispvm-start`` handler)
_DVM_TEMPLATE_CLASSES = ("AppVM", "StandaloneVM")
_PRELOAD_SERVICE = "qubes.WaitForRunningSystem"


def preload_max(app: QubesApp, appvm: Qube) -> int:
    """``get_feat_preload_max``: dom0's ``preload-dispvm-max`` for the global
    ``default_dispvm`` when dom0 has it, else the qube's own."""
    value: str | None = None
    dom0 = app.domains["dom0"]
    if appvm is app.get("default_dispvm", None) and "preload-dispvm-max" in dom0.features:
        value = dom0.features["preload-dispvm-max"]
    if value is None:
        value = appvm.features.get("preload-dispvm-max")
    return int(value or 0)


def check_preload_max(app: QubesApp, vm: Qube, value: str, oldvalue: object) -> None:
    """``domain-feature-pre-set:preload-dispvm-max``: dom0's is checked on the global
    ``default_dispvm`` (adminvm.py:424-447); a disposable template's needs qrexec, the
    ``qubes.WaitForRunningSystem`` RPC and digits (dvmtemplate.py:210-236)."""
    if vm.klass == "AdminVM":
        if value == oldvalue:
            return
        target = app.get("default_dispvm", None)
        if target is None:
            return
        vm = target
    if vm.klass not in _DVM_TEMPLATE_CLASSES:
        return
    if not vm.check_feature("template", "qrexec", None):
        raise exc.QubesValueError("Qube does not support qrexec")
    if not vm.check_feature("template", "supported-rpc." + _PRELOAD_SERVICE, ""):
        raise exc.QubesValueError(f"Qube does not support the RPC '{_PRELOAD_SERVICE}'")
    if not (value or "0").isdigit():
        raise exc.QubesValueError("Invalid preload-dispvm-max value: not a digit")


def preload_start(app: QubesApp, appvm: Qube | None) -> None:
    """``admin.vm.CreateDisposable+preload``: fire ``domain-preload-dispvm-start`` on the
    template (``qubes/api/admin.py``); the answer is empty unless the handler refuses.

    The emulator never preloads: where R4.3 would start preloaded disposables (a
    ``preload-dispvm-max`` above the current list), the request succeeds without them.
    """
    if appvm is None:
        # R4.3 calls None.fire_event_async: AttributeError, an empty reply
        raise AttributeError("'NoneType' object has no attribute 'fire_event_async'")
    if appvm.klass in _DVM_TEMPLATE_CLASSES:
        supported = appvm.check_feature("template", "supported-rpc." + _PRELOAD_SERVICE, "")
        if not supported:
            raise exc.QubesValueError(
                f"Qube does not support the RPC '{_PRELOAD_SERVICE}' but tried to preload, "
                "check if template is outdated"
            )
        wanted = preload_max(app, appvm) - len(appvm.features.get("preload-dispvm", "").split())
        if wanted > 0:
            log.info("%s: not preloading %d disposable(s) (not emulated)", appvm.name, wanted)
    app.fire(appvm, "domain-preload-dispvm-start", reason="autostart was requested")


__all__ = [
    "check_can_generate",
    "check_preload_max",
    "check_template",
    "inherit",
    "preload_max",
    "preload_start",
    "take_volumes",
]
