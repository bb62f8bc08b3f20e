#!/bin/sh
# Emulated qubes run in bubblewrap sandboxes. Install it when missing and we are allowed to;
# otherwise say clearly that sandbox tests will be skipped (exec is then refused, never run on
# the host).
command -v bwrap >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing bubblewrap (apt-get)"
    apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null && exit 0
fi
echo "warning: bubblewrap (bwrap) is not installed; sandboxed qubes will refuse to run commands" >&2
exit 0
