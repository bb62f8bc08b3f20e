"""``template.update``: the distribution's update inside a template, then the template shut down.

The template reaches its mirrors only through ``qubes.UpdatesProxy``, which the generated
policy sends to its scope's egress qube and nowhere else (render.py); the package manager in a
Qubes template is configured for that proxy by the template's own packages. dom0 runs one fixed
``sh -c`` script in the template through its line (``handlers_write.relay``, as ``qube.run``
does, so the run is bounded, marked and audited the same way); the package family is its only
argument, never spliced into the script.

Which package manager: the template's ``os-distribution`` feature (set by ``qubes.PostInstall``
on R4.3), else the script reads ``/etc/os-release`` (``ID``, ``ID_LIKE``). What changed: the
sorted package lists before and after (``dpkg-query -W`` / ``rpm -qa``), compared in dom0. A
diff of lists is robust where parsing a package manager's progress output is not.

The lists are the template's words, so they are parsed as untrusted: only ``name version``
lines of printable ASCII count, and the report is bounded. The audit log keeps counts only.
"""

from __future__ import annotations

import re
from typing import Any

from qubes_mcp.dom0.admin import QubesdError
from qubes_mcp.dom0.context import Context
from qubes_mcp.dom0.errors import FailedError
from qubes_mcp.dom0.handlers_write import relay
from qubes_mcp.dom0.reader import parse_vm_list_line

#: ``os-distribution`` values (R4.3 ``qubes.PostInstall``) and the package family they use
FAMILIES = {
    "debian": "apt",
    "ubuntu": "apt",
    "kali": "apt",
    "whonix": "apt",
    "fedora": "dnf",
    "centos": "dnf",
    "centos-stream": "dnf",
    "rhel": "dnf",
}
#: the family (or nothing: ask /etc/os-release) is $1; stdout is the family, the sorted list
#: before, a ``--`` line, the sorted list after; the update's own output goes to stderr
SCRIPT = r"""
family=$1
if [ -z "$family" ] && [ -r /etc/os-release ]; then
  ids=" $(. /etc/os-release; echo "$ID $ID_LIKE") "
  case $ids in
    *" debian "*|*" ubuntu "*) family=apt ;;
    *" fedora "*|*" rhel "*|*" centos "*) family=dnf ;;
  esac
fi
case $family in
  apt|dnf) ;;
  *) echo "qubes-mcp: no known package manager in this template" >&2; exit 3 ;;
esac
list=$(mktemp) || exit 3
packages() {
  case $family in
    apt) dpkg-query -W -f '${binary:Package} ${Version}\n' ;;
    dnf) rpm -qa --qf '%{NAME}.%{ARCH} %{EPOCHNUM}:%{VERSION}-%{RELEASE}\n' ;;
  esac > "$list" || { echo "qubes-mcp: cannot list the installed packages" >&2; exit 3; }
  LC_ALL=C sort "$list"
}
echo "$family"
packages
echo "--"
case $family in
  apt) { apt-get -q update && DEBIAN_FRONTEND=noninteractive apt-get -q -y upgrade; } >&2 ;;
  dnf) dnf -y -q upgrade --refresh >&2 ;;
esac
status=$?
packages
rm -f "$list"
exit $status
"""
_LINE = re.compile(r"\A([\x21-\x7e]{1,200}) ([\x21-\x7e]{1,200})\Z")
#: each list in the reply, at most (the counts are always whole)
REPORT_CAP = 200
#: the last characters of the update's own output, for the agent
LOG_TAIL = 2000
_FAILURE_TAIL = 400


def _packages(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        m = _LINE.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """What the update did to the package set: upgraded (or downgraded), installed, removed."""
    return {
        "upgraded": [
            {"name": n, "from": before[n], "to": after[n]}
            for n in sorted(before.keys() & after.keys())
            if before[n] != after[n]
        ],
        "installed": [{"name": n, "version": after[n]} for n in sorted(after.keys() - before)],
        "removed": [{"name": n, "version": before[n]} for n in sorted(before.keys() - after)],
    }


def parse_output(stdout: bytes) -> tuple[str, dict[str, str], dict[str, str]] | None:
    """(family, before, after) from the script's stdout, or None when it did not get as far
    as the second list (a failed start, or output cut at the cap)."""
    lines = stdout.decode("ascii", "replace").splitlines()
    if not lines or lines[0] not in ("apt", "dnf") or "--" not in lines:
        return None
    cut = lines.index("--")
    return lines[0], _packages(lines[1:cut]), _packages(lines[cut + 1 :])


async def _family(ctx: Context) -> str:
    try:
        distribution = await ctx.admin.call(ctx.target, "admin.vm.feature.Get", "os-distribution")
    except QubesdError:  # no such feature: the script reads /etc/os-release
        return ""
    return FAMILIES.get(distribution.strip().lower(), "")


async def template_update(ctx: Context) -> dict[str, Any]:
    template = ctx.target
    ctx.detail.update(template=template, dest=ctx.principal.egress_qube)
    try:
        result = await relay(
            ctx, template, ["sh", "-c", SCRIPT, "sh", await _family(ctx)], b"", ctx.args["timeout"]
        )
    finally:
        # whatever happened inside, the template is left shut down (its root volume is
        # committed then, and app qubes get the update at their next start)
        await ctx.qubesd(template, "admin.vm.Shutdown", "wait")
    line = (await ctx.admin.lines(template, "admin.vm.List"))[0]
    state = parse_vm_list_line(line)[1].get("state", "")
    parsed = None if result.stdout_bytes > len(result.stdout) else parse_output(result.stdout)
    if parsed is None:
        said = result.stderr.decode("utf-8", "replace").strip()[-_FAILURE_TAIL:]
        raise FailedError(
            f"the update did not list the template's packages (exit code {result.exit_code})"
            + (f"; it said: {said}" if said else ""),
            reason="no package lists from the template",
        )
    family, before, after = parsed
    changed = changes(before, after)
    ctx.detail["count"] = sum(len(v) for v in changed.values())
    reply: dict[str, Any] = {
        "template": template,
        "manager": family,
        "exit_code": result.exit_code,
        "timed_out": result.timed_out,
        "packages": len(after),
        "state": state,
    }
    for kind, items in changed.items():
        reply[kind] = items[:REPORT_CAP]
        reply[f"{kind}_count"] = len(items)
    reply["log_tail"] = result.stderr.decode("utf-8", "replace")[-LOG_TAIL:]
    return reply
