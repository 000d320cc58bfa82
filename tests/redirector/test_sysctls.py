"""The agent's sysctls: ``ensure`` (files under a root; what it reports) and, in a network namespace, the
kernel behaviour that makes ``tcp_migrate_req`` worth setting — connections queued on a closing SO_REUSEPORT
listener are reset without it and handed to the other listener with it (what an Envoy rollout relies on)."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from redirector.sysctls import REQUIRED, Sysctl, ensure, path
from sandbox.node.netns import NetNS

QUEUED = 32


def test_ensure_sets_keeps_and_reports_failures(tmp_path: Path) -> None:
    file = path(tmp_path, "net.ipv4.tcp_migrate_req")
    assert file == tmp_path / "net" / "ipv4" / "tcp_migrate_req"
    file.parent.mkdir(parents=True)
    file.write_text("0\n")
    assert ensure(tmp_path) == {"net.ipv4.tcp_migrate_req": "set"}
    assert file.read_text() == "1\n"
    assert ensure(tmp_path) == {"net.ipv4.tcp_migrate_req": "kept"}
    missing = ensure(tmp_path / "nowhere")  # e.g. a kernel before 5.14, or /proc/sys not mounted
    assert missing["net.ipv4.tcp_migrate_req"].startswith("failed: ")
    (tmp_path / "ro").mkdir()
    path(tmp_path / "ro", "net.ipv4").mkdir(parents=True)
    path(tmp_path / "ro", "net.ipv4.tcp_migrate_req").mkdir()  # unwritable as a file, even for root
    assert ensure(tmp_path / "ro")["net.ipv4.tcp_migrate_req"].startswith("failed: ")


def test_every_required_setting_says_what_breaks_without_it() -> None:
    assert REQUIRED and all(isinstance(s, Sysctl) and s.why and s.name.count(".") >= 2 for s in REQUIRED)


def _close_with_queue(migrate: bool) -> tuple[int, int]:
    """In this netns: two SO_REUSEPORT listeners, QUEUED connections accepted by the kernel and by nobody
    else, then one listener closed. Returns (connections the other listener accepts, connections reset)."""
    result = ensure(Path("/proc/sys"), (Sysctl("net.ipv4.tcp_migrate_req", "1" if migrate else "0", "test"),))
    assert not result["net.ipv4.tcp_migrate_req"].startswith("failed"), result
    listeners: list[socket.socket] = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 1666))
        s.listen(QUEUED * 2)
        listeners.append(s)
    clients = [socket.create_connection(("127.0.0.1", 1666), timeout=2) for _ in range(QUEUED)]
    listeners[0].close()  # over loopback its resets are delivered before close() returns
    reset = 0
    for c in clients:
        c.setblocking(False)
        try:
            c.recv(1)
        except ConnectionResetError:
            reset += 1
        except BlockingIOError:
            pass  # open, waiting on a listener
    survivor = listeners[1]
    survivor.settimeout(0.05)
    accepted: list[socket.socket] = []
    deadline = time.monotonic() + 5
    while len(accepted) < QUEUED - reset and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            accepted.append(survivor.accept()[0])
    return len(accepted), reset


@pytest.mark.root
@pytest.mark.parametrize("migrate", [False, True], ids=["without", "with"])
def test_tcp_migrate_req_hands_queued_connections_to_the_other_listener(migrate: bool) -> None:
    with NetNS("lpsysctl") as ns:
        accepted, reset = ns.call(_close_with_queue, migrate, timeout=30)
    if migrate:
        assert (accepted, reset) == (QUEUED, 0)
    else:  # the kernel spread the connections over both listeners: the closed one's share is reset
        assert reset > 0 and accepted + reset == QUEUED, (accepted, reset)
