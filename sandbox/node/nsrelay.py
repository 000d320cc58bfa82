"""A TCP relay from inside a network namespace to an address in the caller's namespace.

WHY: the sandbox API server listens on the ROOT namespace's loopback, which a process inside the
"node" namespace (the redirector) cannot reach. Instead of touching the host's network (a veth into
the root namespace, routes, addresses), the relay's listening socket is created inside the node
namespace and its upstream sockets in ours: a socket keeps the namespace it was created in, so one
process can bridge the two. The node-side process simply dials 127.0.0.1:<port> in its own namespace.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from shared.netns import enter


def _listen_in(netns_name: str, host: str, port: int) -> socket.socket:
    """Create the listening socket inside ``netns_name`` from a throw-away thread.

    setns() moves only the calling thread; that thread ends right after, so no other thread (nor
    anything it would create) ever runs in the other namespace.
    """
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            enter(netns_name)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            result.append(sock)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)

    thread = threading.Thread(target=work, name=f"nsrelay-setns-{netns_name}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class NetnsRelay:
    """Listen on ``host:port`` inside ``netns_name``; relay each connection to ``target`` (our namespace)."""

    def __init__(self, netns_name: str, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0) -> None:
        self.netns_name, self.target = netns_name, target
        self._sock = _listen_in(netns_name, host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"nsrelay-{netns_name}", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)  # created here: our namespace
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                self._conns.update((down, up))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._relay, args=(a, b), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        _pump(a, b)
        with self._lock:
            # The second direction to finish closes both sockets.
            if a in self._conns and b not in self._conns:
                self._conns.discard(a)
                a.close()
                b.close()
            else:
                self._conns.discard(a)

    def close(self) -> None:
        self._closed.set()
        # A thread blocked in accept() keeps a closed socket listening; shutdown() wakes it up first.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> NetnsRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
