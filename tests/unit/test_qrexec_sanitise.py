"""Request sanitising: what qrexec-daemon replaces, what it refuses, and who the source is."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.sim.qrexec.request import RefusedError, sanitise_request
from qubes_mcp.sim.qrexec.wire import UntrustedRequest


def req(target: bytes, service: bytes, source: bytes = b"") -> UntrustedRequest:
    return UntrustedRequest(target, service, source)


@pytest.mark.parametrize(
    ("target", "service", "want_target", "want_service"),
    [
        pytest.param(b"work", b"qubes.VMShell", "work", "qubes.VMShell+", id="plain"),
        pytest.param(b"work", b"svc+arg", "work", "svc+arg", id="with-argument"),
        pytest.param(b"work", b"svc+a/b", "work", "svc+a_b", id="slash-in-argument-replaced"),
        pytest.param(b"work", b"../../x", "work", ".._.._x+", id="path-in-service-loses-slashes"),
        pytest.param(b"wo rk;", b"svc", "wo_rk_", "svc+", id="shell-chars-in-target-replaced"),
        pytest.param(b"@dispvm:dvm", b"svc", "@dispvm:dvm", "svc+", id="dispvm-target-kept"),
        pytest.param(b"x" * 100, b"svc", "x" * 63, "svc+", id="target-truncated-to-63"),
        pytest.param(b"w\xffk", b"s\xc3\xa9", "w_k", "s__+", id="non-ascii-replaced-bytewise"),
    ],
)
def test_replaced_like_qrexec_daemon(
    target: bytes, service: bytes, want_target: str, want_service: str
) -> None:
    got = sanitise_request(req(target, service), "personal")
    assert (got.target, got.service_and_arg) == (want_target, want_service)


@pytest.mark.parametrize(
    "service",
    [
        pytest.param(b"", id="empty-service"),
        pytest.param(b"+arg", id="service-starting-with-plus"),
        pytest.param(b"s" * 256, id="service-name-over-NAME_MAX"),
        pytest.param(b"s+" + b"a" * 65000, id="service-and-arg-over-65000"),
    ],
)
def test_refused(service: bytes) -> None:
    with pytest.raises(RefusedError):
        sanitise_request(req(b"work", service), "personal")


def test_qube_socket_ignores_claimed_source() -> None:
    got = sanitise_request(req(b"work", b"svc", b"dom0"), "personal")
    assert got.source == "personal"


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(b"", id="empty-source"),
        pytest.param(b"-x", id="leading-dash"),
        pytest.param(b"a b", id="space"),
        pytest.param(b"x" * 32, id="over-31-chars"),
        pytest.param(b"../etc", id="path"),
    ],
)
def test_control_socket_refuses_malformed_source(source: bytes) -> None:
    with pytest.raises(RefusedError):
        sanitise_request(req(b"work", b"svc", source), None)


def test_control_socket_takes_named_source() -> None:
    assert sanitise_request(req(b"work", b"svc", b"mgmt"), None).source == "mgmt"


@given(st.binary(max_size=80), st.binary(max_size=300), st.binary(max_size=40))
def test_any_bytes_give_safe_names_or_a_refusal(target: bytes, service: bytes, src: bytes) -> None:
    for vm_source in ("work", None):
        try:
            got = sanitise_request(req(target, service, src), vm_source)
        except RefusedError:
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-@:]{0,63}", got.target)
        assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,255}", got.service)
        assert re.fullmatch(r"[A-Za-z0-9_.\-+]*", got.arg)
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", got.source)
