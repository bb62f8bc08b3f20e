"""The gate's dom0 command line for one run: fixed shape, VMExec-encoded words, the bound and
the marker inside the qube (``dom0/relay.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_mcp.dom0 import relay
from qubes_mcp.sim.vm_files.vmexec import decode_args


def test_the_command_line_is_qrexec_client_with_a_vmexec_call() -> None:
    argv = relay.run_argv(
        Path("/usr/lib/qubes/qrexec-client"), "work", ["ls", "-l"], run_id="r1", timeout=30,
        user="root",
    )  # fmt: skip
    assert argv[:3] == ["/usr/lib/qubes/qrexec-client", "-d", "work"]
    user, _, rest = argv[3].partition(":")
    service, source = rest.removeprefix("QUBESRPC ").split(" ")
    assert (user, source, len(argv)) == ("root", "dom0", 4)
    words = decode_args(service.removeprefix("qubes.VMExec+").encode())
    assert words == [
        b"env", b"QMCP_RUN_ID=r1", b"timeout", b"--signal=TERM", b"--kill-after=2", b"30",
        b"ls", b"-l",
    ]  # fmt: skip


_WORD = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))


@given(st.lists(_WORD, min_size=1, max_size=6).filter(lambda words: words[0] != ""))
def test_every_word_survives_the_encoding(words: list[str]) -> None:
    encoded = relay.encode_vmexec(words)
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+")
    assert [w.decode() for w in decode_args(encoded.encode())] == words


@pytest.mark.parametrize("run_id", ["", "a b", "x;y", "$(id)", "a" * 65, "-\n"])
def test_a_bad_run_id_is_refused(run_id: str) -> None:
    with pytest.raises(ValueError, match="run id"):
        relay.wrapped_command(["true"], run_id, 10)


def test_cancel_ignores_ids_that_are_not_run_ids() -> None:
    import asyncio

    # nothing valid to cancel: no call into the qube at all (the client path does not exist)
    assert asyncio.run(relay.cancel_in_qube(Path("/nonexistent"), "work", ["a b", ""])) is True
