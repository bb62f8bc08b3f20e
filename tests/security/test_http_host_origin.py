"""The MCP server's HTTP transport answers only loopback Host and Origin (issue 7 §7).

A web page in the control qube's browser can reach ``127.0.0.1`` through DNS rebinding; it
then sends its own Host and Origin. A real ``qubes-mcp serve --transport http`` process is
spoken to with a real HTTP client (``http.client``, which lets a test set any Host header).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubes_mcp.server.http_guard import allowed

BIN = Path(sys.executable).parent
INIT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"},
        },
    }
).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    port = _free_port()
    log = tmp_path_factory.mktemp("http") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "qubes-mcp"), "serve", "--transport", "http", "--port", str(port)],
            stdout=out,
            stderr=out,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline, "the HTTP server did not start"
                time.sleep(0.05)
            yield port, log
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def post(port: int, host: str | None, origin: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/mcp", skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        if origin is not None:
            conn.putheader("Origin", origin)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Accept", "application/json, text/event-stream")
        conn.putheader("Content-Length", str(len(INIT)))
        conn.endheaders(INIT)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_loopback_request_is_served(server: tuple[int, Path]) -> None:
    port, _log = server
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, body = post(port, host)
        assert status == 200, body
        assert b'"serverInfo"' in body
    status, body = post(port, f"127.0.0.1:{port}", f"http://localhost:{port}")
    assert status == 200, body


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("evil.example", None),
        ("evil.example:{port}", None),
        ("{port_host}", "http://evil.example"),
        ("{port_host}", "http://evil.example:{port}"),
        ("evil.example:{port}", "http://evil.example:{port}"),  # the DNS-rebinding pair
        ("{port_host}", "http://127.0.0.1:1"),  # another local web server's page
        ("{port_host}", "null"),  # a sandboxed iframe / file: page
        ("127.0.0.1", None),  # no port: not what a client of this server sends
    ],
)
def test_a_foreign_host_or_origin_gets_403(
    server: tuple[int, Path], host: str | None, origin: str | None
) -> None:
    port, _log = server

    def fill(text: str | None) -> str | None:
        if text is None:
            return None
        return text.format(port=port, port_host=f"127.0.0.1:{port}")

    status, body = post(port, fill(host), fill(origin))
    assert status == 403, body
    assert b"serverInfo" not in body


def test_a_request_without_host_is_refused(server: tuple[int, Path]) -> None:
    port, _log = server
    status, body = post(port, None)
    assert status in (400, 403), body  # HTTP/1.1 requires Host: uvicorn refuses it first
    assert b"serverInfo" not in body


def test_no_access_log_line_per_request(server: tuple[int, Path]) -> None:
    port, log = server
    post(port, f"127.0.0.1:{port}")
    time.sleep(0.2)
    assert "POST /mcp" not in log.read_text(errors="replace")


def test_the_rule_is_exact_about_host_port_and_origin() -> None:
    assert allowed("127.0.0.1:8765", None, 8765)
    assert allowed("[::1]:8765", "http://[::1]:8765", 8765)
    assert allowed("LOCALHOST:8765", "http://localhost:8765", 8765)
    assert not allowed("127.0.0.1:8766", None, 8765)
    assert not allowed("127.0.0.1:8765", "https://127.0.0.1:8765", 8765)
    assert not allowed("127.0.0.2:8765", None, 8765)
    assert not allowed("127.0.0.1:8765@evil.example", None, 8765)
