"""Random bytes at the router's sockets: every connection ends in a refusal or a clean close,
and the router keeps answering real calls."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_qrexec_fakes import Background

from qubes_mcp.sim.qrexec import wire


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    with Background.running(tmp_path_factory.mktemp("fuzz")) as bg:
        yield bg


frames = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda d: wire.encode_frame(wire.REQUEST, d), st.binary(max_size=256)),
    st.builds(
        lambda t, s, rest: wire.encode_frame(wire.REQUEST, t + b"\0" + s + b"\0") + rest,
        st.binary(max_size=70),
        st.binary(max_size=70),
        st.binary(max_size=256),
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=frames, to_qube=st.booleans())
def test_random_bytes_never_stop_the_router(router: Background, data: bytes, to_qube: bool) -> None:
    assert router.env is not None
    path = router.env.paths.vm_agent_sock("work") if to_qube else router.env.paths.router_sock
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(30)
        raw.connect(str(path))
        with contextlib.suppress(OSError):
            raw.sendall(data)
            raw.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := raw.recv(65536):
                reply += chunk
    # whatever came back is well-formed frames (a refusal, or a call's output and exit code)
    reader_frames = []
    left, right = socket.socketpair()
    with left, right:
        left.sendall(reply)
        left.shutdown(socket.SHUT_WR)
        while (frame := wire.read_frame_sync(right)) is not None:
            reader_frames.append(frame[0])
    assert not reader_frames or reader_frames[0] in (wire.REFUSED, wire.ACCEPTED)
    assert router.call("work", "test.Echo", b"ping") == 0  # still serving


def test_router_still_answers_after_the_fuzzing(router: Background) -> None:
    assert router.call("work", "test.Echo", b"x") == 0
    assert router.call("personal", "test.Echo", b"x") == 126
