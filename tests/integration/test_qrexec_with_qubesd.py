"""The router on the real emulated qubesd, driven through ``qubes-mcp sim run`` / ``sim call``
(the lead's ``emulator`` fixture, demo fleet)."""

from __future__ import annotations

import pytest

try:
    from qubes_mcp.sim.qubesd import open_app, start_qubesd  # noqa: F401
except ImportError as exc:  # helper B's qubesd has not landed yet
    pytest.skip(
        f"emulated qubesd (qubes_mcp.sim.qubesd.start_qubesd/open_app) not available: {exc}",
        allow_module_level=True,
    )

from qubes_mcp.policy import PolicyError, SystemInfo
from tests.emulator_process import RunningEmulator

try:  # qubesd R4.3 sends "internal": None (the feature's value, absent) for most qubes
    SystemInfo.from_json({"domains": {"dom0": {"type": "AdminVM", "tags": [], "internal": None}}})
except PolicyError as exc:
    pytest.skip(
        f"qubes_mcp.policy.SystemInfo rejects qubesd's system info ({exc}); every call would "
        "be refused",
        allow_module_level=True,
    )


def allow(emulator: RunningEmulator, text: str) -> None:
    (emulator.paths.policy_dirs[-1] / "30-test.policy").write_text(text)


def test_denied_by_stock_policy(emulator: RunningEmulator) -> None:
    result = emulator.call("work", "vault", "qubes.VMShell", b"true\n")
    assert (result.returncode, result.stderr) == (126, b"Request refused\n")


def test_admin_api_through_qrexec_reaches_qubesd(emulator: RunningEmulator) -> None:
    # qubesd lists only the qubes the caller's admin.vm.List policy covers (§7.3)
    allow(emulator, "admin.vm.List * mcp-control @adminvm allow target=dom0\n")
    only_dom0 = emulator.call("mcp-control", "@adminvm", "admin.vm.List")
    assert only_dom0.returncode == 0
    assert only_dom0.stdout.startswith(b"0\x00dom0 class=AdminVM state=Running")
    assert b"work" not in only_dom0.stdout
    allow(
        emulator,
        "admin.vm.List * mcp-control @adminvm allow target=dom0\n"
        "admin.vm.List * mcp-control @anyvm allow target=dom0\n",
    )
    everything = emulator.call("mcp-control", "@adminvm", "admin.vm.List")
    assert b"\nwork class=AppVM state=" in everything.stdout


@pytest.mark.bwrap
def test_autostart_and_run_in_target(emulator: RunningEmulator) -> None:
    allow(emulator, "qubes.VMShell * mcp-control work allow\n")
    result = emulator.call("mcp-control", "work", "qubes.VMShell", b"hostname\n")
    assert (result.returncode, result.stdout) == (0, b"work\n")
    assert emulator.paths.vm_agent_sock("work").is_socket()


@pytest.mark.bwrap
def test_disposable_lifecycle_on_real_qubesd(emulator: RunningEmulator) -> None:
    result = emulator.call("work", "@dispvm", "qubes.VMShell", b"hostname\n")
    assert result.returncode == 0
    assert result.stdout.startswith(b"disp")


def test_agent_sockets_follow_real_power_state(emulator: RunningEmulator) -> None:
    import asyncio

    from qubes_mcp.sim.qrexec.qubesd_client import QubesdClient

    sock = emulator.paths.vm_agent_sock("vault")

    async def main() -> None:
        client = QubesdClient(emulator.paths)
        assert not sock.exists()
        await client.start("vault")
        async with asyncio.timeout(20):
            while not sock.is_socket():
                await asyncio.sleep(0.02)
        await client.call("vault", "admin.vm.Shutdown")
        async with asyncio.timeout(20):
            while sock.exists():
                await asyncio.sleep(0.02)

    asyncio.run(main())
