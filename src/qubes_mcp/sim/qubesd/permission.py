"""``admin-permission:<method>`` handlers of R4.3 ``qubes/ext/admin.py``.

Vetoes (``PermissionDenied``, a zero-byte reply): the prohibited features, and
``created-by-*`` tags for sources other than dom0. Filters, for callers other than dom0:
``admin.vm.List`` keeps a qube only if qrexec policy ``admin.vm.List +<arg>`` from the caller
to that qube resolves to allow; ``admin.Events`` keeps an event only if ``admin.Events
+<event with : replaced by _>`` to its subject (or its ``vm`` kwarg, or ``@adminvm``) does.
``ask`` counts as no, and any failure to load or evaluate the policy is a deny.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qubes_mcp.sim import exc
from qubes_mcp.sim.qubesd.vm import Qube

if TYPE_CHECKING:
    from qubes_mcp.sim.qubesd.api import Call

log = logging.getLogger("qubes_mcp.sim.qubesd")

PROHIBITED_FEATURES = frozenset(
    {
        "deferred-netvm-original",
        "preload-dispvm",
        "preload-dispvm-completed",
        "preload-dispvm-in-progress",
    }
)

Filter = Callable[[Any], bool]


def check(call: Call, kwargs: dict[str, object]) -> list[Filter]:
    """Run the permission handlers for ``call``; return the filters they ask for."""
    meth = call.method
    if meth in ("admin.vm.feature.Set", "admin.vm.feature.Remove"):
        if call.arg in PROHIBITED_FEATURES:
            raise exc.PermissionDenied("changing this feature is prohibited")
    elif meth in ("admin.vm.tag.Set", "admin.vm.tag.Remove"):
        if call.arg.startswith("created-by-") and call.src.klass != "AdminVM":
            raise exc.PermissionDenied("changing this tag is prohibited")
    elif meth == "admin.vm.List" and call.src.klass != "AdminVM":
        return [_policy_filter(call, "admin.vm.List", lambda vm: ("+" + call.arg, vm.name))]
    elif meth == "admin.Events" and call.src.klass != "AdminVM":
        return [_policy_filter(call, "admin.Events", _event_target)]
    return []


def _event_target(item: tuple[Any, str, dict[str, object]]) -> tuple[str, str]:
    subject, event, kw = item
    if isinstance(subject, Qube):
        dest = subject.name
    elif isinstance(kw.get("vm"), Qube):
        dest = str(kw["vm"])
    else:
        dest = "@adminvm"
    return "+" + event.replace(":", "_"), dest


class _PolicyCache:
    """Reload the policy only when a file in the policy directories changed (like the
    inotify-driven ``PolicyCache`` qubesd uses)."""

    def __init__(self) -> None:
        self._key: tuple[tuple[str, int, int], ...] | None = None
        self._policy: Any = None

    @staticmethod
    def _signature(dirs: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
        sig: list[tuple[str, int, int]] = []
        for d in dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.rglob("*")):
                try:
                    st = p.stat()
                except OSError:
                    continue
                sig.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def get(self, dirs: tuple[Path, ...]) -> Any:
        """The loaded policy, or None when it cannot be loaded (deny everything)."""
        key = self._signature(dirs)
        if key != self._key:
            self._key = key
            try:
                # qrexec always has both directories; a missing one here just has no files
                self._policy = _policy_api().Policy.load(tuple(d for d in dirs if d.is_dir()))
            except Exception:  # noqa: BLE001 - fail closed: any load failure denies all
                log.warning("policy cannot be loaded; admin filters deny everything")
                self._policy = None
        return self._policy


_CACHE = _PolicyCache()


def _for_policy(info: dict[str, Any]) -> dict[str, Any]:
    """R4.3 sends ``internal`` as the feature's value (null or a string); the policy code
    reads it as a truth value, so hand the engine a boolean."""
    return {
        "domains": {
            name: {**entry, "internal": bool(entry.get("internal"))}
            for name, entry in info["domains"].items()
        }
    }


def _policy_api() -> Any:
    """The policy engine, imported late (it may not be installed yet: then all deny)."""
    return importlib.import_module("qubes_mcp.policy")


def _policy_filter(
    call: Call, service: str, request_of: Callable[[Any], tuple[str, str]]
) -> Filter:
    app = call.app
    source = call.src.name

    def allowed(item: Any) -> bool:
        policy = _CACHE.get(app.paths.policy_dirs)
        if policy is None:
            return False
        try:
            api = _policy_api()
            argument, target = request_of(item)
            resolution = policy.evaluate(
                service=service,
                argument=argument,
                source=source,
                target=target,
                system_info=api.SystemInfo.from_json(_for_policy(app.system_info())),
            )
            return isinstance(resolution, api.AllowResolution)
        except Exception:  # noqa: BLE001 - AccessDenied, PolicyError or a bug: all deny
            return False

    return allowed
