#!/bin/sh
# System tools the tests use, installed when missing and we are allowed to (root with apt-get):
# - bubblewrap: emulated qubes run in bwrap sandboxes. Without it, sandbox tests are skipped
#   with a reason (exec is then refused, never run on the host).
# - rpm: rpmbuild builds the dom0 RPM (make rpm); CI builds and checks it.
missing=""
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
command -v rpmbuild >/dev/null 2>&1 || missing="$missing rpm"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$missing (apt-get)"
    apt-get update -qq >/dev/null && apt-get install -y -qq $missing >/dev/null && exit 0
fi
echo "warning: not installed:$missing; the tests that need them are skipped with a reason" >&2
exit 0
