"""``file.copy`` end to end on the emulator: dom0 relays the bytes between the two qubes.

The gate runs ``qfile-agent`` in the source and ``qfile-unpacker`` in the destination, each over
its own ``qvm-run`` line, and joins the streams under the operator's caps. These tests check
what lands (exact bytes, binary content, several files and trees), that crossing a cap stops
the copy before anything above it lands, that a missing path is an error with a ``failed``
audit outcome, that a guarded qube's copy waits for the operator, and the dump sink.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from qubes_mcp.stack import Stack, start_stack
from tests.gate_e2e import answer_when_pending, audit_lines, code, dom0_admin, gate_call, ok

pytestmark = pytest.mark.bwrap

CAP_BYTES = 64 * 1024
CAP_FILES = 6


def _small_caps(text: str) -> str:
    limits = f"[limits]\ncopy_bytes = {CAP_BYTES}\ncopy_files = {CAP_FILES}\n\n"
    return text.replace("[budget]", limits + "[budget]", 1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("copy") / "root", config_edit=_small_caps)
    try:
        yield s
    finally:
        s.stop()


def run(stack: Stack, qube: str, script: str) -> str:
    result = ok(gate_call(stack, qube, "qmcp.Run", {"command": ["sh", "-c", script]}))
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def copy(stack: Stack, source: str, dest: str, *paths: str) -> dict[str, Any]:
    return gate_call(stack, source, "qmcp.Copy", {"destination": dest, "paths": list(paths)})


def last_copy_audit(stack: Stack) -> dict[str, Any]:
    return [line for line in audit_lines(stack) if line["op"] == "file.copy"][-1]


def test_a_copy_lands_with_the_same_bytes_and_is_audited(stack: Stack) -> None:
    run(stack, "ai-dev", "printf 'hello\\nworld\\n' > /home/user/plain.txt")
    result = ok(copy(stack, "ai-dev", "ai-build", "/home/user/plain.txt"))
    assert result == {
        "source": "ai-dev",
        "destination": "ai-build",
        "paths": ["/home/user/plain.txt"],
        "copied": True,
        "files": 1,
        "bytes": 12,
        "landed_in": "/home/user/QubesIncoming/ai-dev/",
    }
    assert run(stack, "ai-build", "cat /home/user/QubesIncoming/ai-dev/plain.txt") == (
        "hello\nworld\n"
    )
    # owned by the destination's user, in a directory only that user may enter, like qvm-copy
    modes = run(
        stack, "ai-build", "stat -c %a /home/user/QubesIncoming /home/user/QubesIncoming/ai-dev"
    )
    assert modes.split() == ["700", "700"]
    line = last_copy_audit(stack)
    assert (line["decision"], line["outcome"]) == ("allowed", "ok")
    assert {k: line["detail"].get(k) for k in ("source", "dest", "files", "bytes")} == {
        "source": "ai-dev",
        "dest": "ai-build",
        "files": 1,
        "bytes": 12,
    }


def test_a_binary_file_arrives_bit_for_bit(stack: Stack) -> None:
    digest = run(
        stack,
        "ai-dev",
        "cd /home/user && head -c 50000 /dev/urandom > blob.bin"
        " && printf '\\0\\377\\n' >> blob.bin && sha256sum < blob.bin",
    )
    ok(copy(stack, "ai-dev", "ai-build", "/home/user/blob.bin"))
    landed = run(stack, "ai-build", "sha256sum < /home/user/QubesIncoming/ai-dev/blob.bin")
    assert landed == digest and len(digest.split()[0]) == 64


def test_several_files_and_a_tree_in_one_copy(stack: Stack) -> None:
    run(
        stack,
        "ai-dev",
        "cd /home/user && mkdir -p tree/sub && echo a > tree/a && echo b > tree/sub/b"
        " && echo c > c.txt && ln -sf sub/b tree/link",
    )
    result = ok(copy(stack, "ai-dev", "ai-build", "/home/user/tree", "/home/user/c.txt"))
    assert (result["files"], result["bytes"]) == (6, 2 + 2 + 5 + 2)  # tree, sub, a, b, link, c
    got = run(
        stack,
        "ai-build",
        "cd /home/user/QubesIncoming/ai-dev && cat tree/a tree/sub/b c.txt && readlink tree/link",
    )
    assert got == "a\nb\nc\nsub/b\n"


def test_the_byte_cap_stops_the_copy_before_the_file_that_crosses_it(stack: Stack) -> None:
    run(stack, "ai-dev", f"head -c {CAP_BYTES + 1} /dev/zero > /home/user/big.bin")
    reply = copy(stack, "ai-dev", "ai-build", "/home/user/big.bin")
    assert reply["error"] == {
        "code": "failed",
        "message": f"the copy exceeds the operator's limit of {CAP_BYTES} bytes",
    }
    assert run(
        stack, "ai-build", "ls /home/user/QubesIncoming/ai-dev/big.bin 2>&1 || true"
    ).endswith("No such file or directory\n")
    line = last_copy_audit(stack)
    assert (line["outcome"], line["code"], line["detail"]["bytes"]) == ("failed", "failed", 0)
    # exactly at the cap is fine
    run(stack, "ai-dev", f"head -c {CAP_BYTES} /dev/zero > /home/user/exact.bin")
    assert ok(copy(stack, "ai-dev", "ai-build", "/home/user/exact.bin"))["bytes"] == CAP_BYTES


def test_the_file_cap_stops_the_copy(stack: Stack) -> None:
    run(
        stack,
        "ai-dev",
        "mkdir -p /home/user/many && for i in 1 2 3 4 5 6 7; do echo $i > /home/user/many/f$i;"
        " done",
    )
    reply = copy(stack, "ai-dev", "ai-build", "/home/user/many")
    assert reply["error"] == {
        "code": "failed",
        "message": f"the copy exceeds the operator's limit of {CAP_FILES} files",
    }
    landed = run(stack, "ai-build", "ls /home/user/QubesIncoming/ai-dev/many | wc -l")
    assert int(landed) == CAP_FILES - 1  # the directory counts as one entry
    assert last_copy_audit(stack)["outcome"] == "failed"


def test_a_missing_path_is_an_error_and_the_audit_says_failed(stack: Stack) -> None:
    reply = copy(stack, "ai-dev", "ai-build", "/home/user/no-such-file")
    assert reply == {
        "ok": False,
        "error": {
            "code": "failed",
            "message": (
                "the copy failed: a path does not exist or cannot be read in the source qube"
            ),
        },
    }
    line = last_copy_audit(stack)
    assert (line["decision"], line["outcome"], line["code"]) == ("allowed", "failed", "failed")


def test_a_name_already_in_incoming_is_refused_by_the_receiver(stack: Stack) -> None:
    run(stack, "ai-dev", "echo one > /home/user/twice.txt")
    ok(copy(stack, "ai-dev", "ai-build", "/home/user/twice.txt"))
    reply = copy(stack, "ai-dev", "ai-build", "/home/user/twice.txt")
    assert code(reply) == "failed"
    assert "already in the destination's QubesIncoming" in reply["error"]["message"]


def test_relative_paths_are_invalid_input(stack: Stack) -> None:
    reply = copy(stack, "ai-dev", "ai-build", "plain.txt")
    assert reply["error"]["code"] == "invalid-input"


def test_a_copy_into_the_dump_sink(stack: Stack) -> None:
    run(stack, "ai-dev", "echo for-the-sink > /home/user/dump.txt")
    result = ok(copy(stack, "ai-dev", "ai-dump", "/home/user/dump.txt"))
    assert result["landed_in"] == "/home/user/QubesIncoming/ai-dev/"
    landed = dom0_admin(stack, "ai-dump", "admin.vm.List")  # the sink exists and is a qube
    assert landed.startswith("ai-dump ")


def test_a_guarded_qubes_copy_waits_for_the_operator(stack: Stack) -> None:
    run(stack, "ai-dev", "echo guarded > /home/user/guarded.txt")
    dom0_admin(stack, "ai-build", "admin.vm.tag.Set", "ai-guarded")
    try:
        denier = answer_when_pending(stack, "deny", op="file.copy")
        denied = copy(stack, "ai-dev", "ai-build", "/home/user/guarded.txt")
        denier.join(30)
        assert code(denied) == "consent-denied"
        approver = answer_when_pending(stack, "approve", op="file.copy")
        approved = copy(stack, "ai-dev", "ai-build", "/home/user/guarded.txt")
        approver.join(30)
        # had the denied copy landed, this one would meet its file and fail
        assert ok(approved)["copied"] is True
    finally:
        dom0_admin(stack, "ai-build", "admin.vm.tag.Remove", "ai-guarded")
    assert run(stack, "ai-build", "cat /home/user/QubesIncoming/ai-dev/guarded.txt") == "guarded\n"
    copies = [line for line in audit_lines(stack) if line["op"] == "file.copy"]
    assert any(line.get("code") == "consent-denied" for line in copies)
    assert (copies[-1]["outcome"], copies[-1]["detail"]["consent"]) == ("ok", "approved")


def test_two_copies_at_once_both_land(stack: Stack) -> None:
    run(stack, "ai-dev", "echo x > /home/user/par1 && echo y > /home/user/par2")
    replies: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda p=p: replies.append(copy(stack, "ai-dev", "ai-build", p)))
        for p in ("/home/user/par1", "/home/user/par2")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(replies) == 2 and all(r.get("ok") for r in replies), replies
