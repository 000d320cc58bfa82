"""The relay that lets a process in the node namespace reach the API server on the root loopback."""

from __future__ import annotations

import socket
import threading

import pytest

from sandbox.node.netns import NetNS, run_in_netns
from sandbox.node.nsrelay import NetnsRelay

pytestmark = pytest.mark.root


def _exchange(port: int, payloads: list[bytes]) -> list[bytes]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for p in payloads:
            s.sendall(p)
            out.append(s.recv(65536))
        s.shutdown(socket.SHUT_WR)
        out.append(s.recv(65536))  # b"" once the far side closed too
    return out


def test_relay_bridges_loopbacks_of_two_namespaces() -> None:
    server = socket.create_server(("127.0.0.1", 0))  # our loopback: invisible from the other namespace
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    with NetNS(f"lpe2e-{__import__('os').getpid()}-relay") as ns:
        with pytest.raises(ConnectionRefusedError):
            run_in_netns(ns.name, _exchange, port, [b"x"])
        with NetnsRelay(ns.name, ("127.0.0.1", port)) as relay:
            assert run_in_netns(ns.name, _exchange, relay.port, [b"hello", b"again"]) == [b"HELLO", b"AGAIN", b""]
            assert run_in_netns(ns.name, _exchange, relay.port, [b"second"]) == [b"SECOND", b""]
        with pytest.raises(ConnectionRefusedError):
            run_in_netns(ns.name, _exchange, relay.port, [b"x"])
    server.close()
