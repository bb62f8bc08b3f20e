"""``admin.vm.property.Help`` / ``admin.property.Help``: R4.3's checks and errors; the text
describes the property from its definition (R4.3 sends a docstring the emulator lacks)."""

from __future__ import annotations

from tests.qubesd_fixtures import Qubesd, demo_fixture, err, ok  # noqa: F401 - fixture


def test_help_describes_the_property(demo: Qubesd) -> None:
    assert demo.call("work", "admin.vm.property.Help", "netvm") == ok("netvm: a qube (or none).")
    assert demo.call("work", "admin.vm.property.Help", "qid") == ok(
        "qid: an integer (it can be set only once)."
    )
    assert demo.call("dom0", "admin.property.Help", "default_netvm").startswith(b"0\0")


def test_unknown_property_is_the_r43_error(demo: Qubesd) -> None:
    assert demo.call("work", "admin.vm.property.Help", "nope") == err(
        "QubesNoSuchPropertyError", "Invalid property 'nope' of work"
    )


def test_global_help_on_a_qube_and_a_payload_are_refused_silently(demo: Qubesd) -> None:
    before = demo.snapshot()
    assert demo.call("work", "admin.property.Help", "default_netvm") == b""
    assert demo.call("work", "admin.vm.property.Help", "netvm", b"x") == b""
    assert demo.snapshot() == before
