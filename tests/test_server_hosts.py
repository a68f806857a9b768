"""DNS rebinding against a real ``streamlit run app.py``: a WebSocket whose Host is not this machine's name is
refused (``server.allowedHosts`` in .streamlit/config.toml), so a web page that re-points its own host name at
127.0.0.1 cannot drive a local-mode app; the names a user types for this machine still work."""

from __future__ import annotations

import socket

import pytest

from benchmarks.app_render import free_port, start_server, stop, wait_healthy

pytestmark = pytest.mark.slow


def _handshake(port: int, host: str) -> str:
    """The status line the server answers to a WebSocket upgrade of Streamlit's stream sent with ``host``."""
    request = (f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: http://{host}:{port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).decode(errors="replace").split("\r\n", 1)[0]


def test_a_websocket_for_another_host_name_is_refused(tiny_model_dir):
    port = free_port()
    proc = start_server(tiny_model_dir.parent, port)
    try:
        wait_healthy(port, 120)
        for host in ("127.0.0.1", "localhost", "[::1]"):
            assert " 101 " in _handshake(port, host) + " ", host
        for host in ("evil.example", "cxr.attacker.test", "127.0.0.1.nip.io"):
            status = _handshake(port, host)
            assert " 101" not in status and status.startswith("HTTP/1.1 4"), (host, status)
    finally:
        stop(proc)
