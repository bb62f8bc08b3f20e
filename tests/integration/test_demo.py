"""The README's main job: the demo runs start to finish and shows what it claims to show."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bwrap


def test_the_demo_transcript(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qubes_mcp.cli", "demo", "--root", str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    listed = out.split("2. Read a qube")[0]
    assert "ai-dev       AppVM" in listed and "tier=exec" in listed
    for hidden in (" vault ", " personal ", " sys-net "):
        assert hidden not in listed.replace(
            "(the fleet also has vault, personal, work, sys-net", ""
        )
    assert out.count("not-found: no such qube, or not yours") == 2  # vault and a made-up name
    assert '"template": "<out-of-scope>"' in out
    assert "[dom0] tags: ai-exec ai-managed ai-owner-mcp-control" in out
    assert "root\n          ai-dev\n          no network" in out
    assert "insufficient-tier: needs exec" in out
    assert "ai-build has it: hello" in out
    assert "qubes-mcp-admin approve" in out and '"removed": true' in out
    assert "consent-denied: the operator did not approve this request" in out
    assert "not-allowed: netvm can be set to null" in out
    link = out.split("9. A lab link")[1].split("10. The research loop")[0]
    fetched = link.split("dom0  ✓ hello from ai-build")
    assert len(fetched) == 2  # once, while the link is open: refused before and after
    assert "curl  ✗ exit 7" in fetched[0] and "curl  ✗ exit 7" in fetched[1]
    assert "qubes.ConnectTCP +8080 ai-web ai-build allow" in link and "closed" in fetched[1]
    loop = out.split("10. The research loop")[1].split("11. The operator")[0]
    assert "attack answered: ok /poc" in loop  # over the link, from the PoC built in ai-poc
    assert "ai-usb is Halted after the attack" in loop
    assert "the loot is in the dump sink: /home/user/QubesIncoming/ai-web/" in loop
    assert re.search(r"console: .*ai-usb died \(exit status", loop)  # read after the crash
    assert "after revert the config says: clean" in loop  # the attack's write is gone
    assert loop.count("[dom0] operator runs: qubes-mcp-admin approve") == 3  # link, revert, rm
    assert '"qube": "ai-poc",\n            "removed": true' in loop
    assert "chain intact" in out
    assert "Error calling tool" not in result.stdout + result.stderr
