"""Netlink questions the debug endpoints ask the kernel: who listens on the proxy port, which addresses
are local. Imperative shell over pyroute2.

WHY sock_diag and not a connect(): a probe connection would be accepted by the proxy (a log line, a
counted connection, maybe a TLS error), and would pass through our own nat output rules. Listing the
TCP sockets in LISTEN state asks the kernel without touching the proxy.

WHY "local" means the local routing table: the NodePort rule matches ``fib daddr type local``, which is
a lookup in table 255 (so all of 127.0.0.0/8 is local, not just 127.0.0.1).

pyroute2 0.9 opens its sockets per thread, lazily. Every query here opens its sockets, uses them and
closes them in ONE thread; with ``netns`` set (tests) that thread first enters the named namespace.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from redirector.model import Family
from shared.errors import RedirectorError
from shared.netns import enter

T = TypeVar("T")
TCP_LISTEN = 10  # include/net/tcp_states.h
RTN_LOCAL = 2  # include/uapi/linux/rtnetlink.h
LOCAL_TABLE = 255
FAMILIES: tuple[tuple[Family, socket.AddressFamily], ...] = ((4, socket.AF_INET), (6, socket.AF_INET6))


@dataclass(frozen=True, order=True)
class ListeningSocket:
    family: Family
    address: str
    port: int


class NetlinkError(RedirectorError, RuntimeError):
    """A netlink query failed (the endpoint answers 503 with this message)."""


class NetlinkProbe:
    """Read-only netlink queries. ``netns``: run them inside /run/netns/<netns> (tests); None: our own."""

    def __init__(self, netns: str | None = None, timeout: float = 5.0) -> None:
        self.netns = netns
        self.timeout = timeout

    def listeners(self, port: int) -> list[ListeningSocket]:
        """TCP sockets in LISTEN state on ``port``, IPv4 and IPv6, of every process in the namespace."""
        return self._call(_listeners, port)

    def loopback_listeners(self, uid: int | None, exclude: frozenset[int]) -> list[ListeningSocket]:
        """TCP LISTEN sockets (of ``uid``, unless None) on a loopback address, except on the ``exclude``
        ports: where the node's Envoy (uid 101) has its admin, whose port the kernel picks (port 0)."""
        return self._call(_loopback_listeners, uid, exclude)

    def local_prefixes(self) -> list[str]:
        """Prefixes of the local routing table's ``local`` routes ("10.244.0.1/32", "127.0.0.0/8", ...)."""
        return self._call(_local_prefixes)

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        result: list[T] = []
        error: list[BaseException] = []

        def work() -> None:
            try:
                if self.netns is not None:
                    enter(self.netns)
                result.append(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                error.append(exc)

        # A fresh thread even without netns: pyroute2 keeps per-thread sockets, which must not pile up in
        # the server's worker threads.
        thread = threading.Thread(target=work, name="debug-netlink", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise NetlinkError(f"netlink query did not answer within {self.timeout}s")
        if error:
            raise NetlinkError(f"netlink query failed: {type(error[0]).__name__}: {error[0]}") from error[0]
        return result[0]


def _listeners(port: int) -> list[ListeningSocket]:
    from pyroute2 import DiagSocket  # type: ignore[import-untyped,unused-ignore]

    found: set[ListeningSocket] = set()
    with DiagSocket() as diag:
        diag.bind()
        for family, af in FAMILIES:
            for sock in diag.get_sock_stats(family=af, states=1 << TCP_LISTEN):
                if sock.get("idiag_sport") == port and sock.get("idiag_state") == TCP_LISTEN:
                    found.add(ListeningSocket(family, str(sock.get("idiag_src")), port))
    return sorted(found)


def _loopback_listeners(uid: int | None, exclude: frozenset[int]) -> list[ListeningSocket]:
    import ipaddress

    from pyroute2 import DiagSocket  # type: ignore[import-untyped,unused-ignore]

    found: set[ListeningSocket] = set()
    with DiagSocket() as diag:
        diag.bind()
        for family, af in FAMILIES:
            for sock in diag.get_sock_stats(family=af, states=1 << TCP_LISTEN):
                port, address = sock.get("idiag_sport"), str(sock.get("idiag_src"))
                if ((uid is None or sock.get("idiag_uid") == uid) and port not in exclude
                        and sock.get("idiag_state") == TCP_LISTEN and ipaddress.ip_address(address).is_loopback):
                    found.add(ListeningSocket(family, address, int(port)))
    return sorted(found)


def _local_prefixes() -> list[str]:
    from pyroute2 import IPRoute  # type: ignore[import-untyped,unused-ignore]

    prefixes: list[str] = []
    with IPRoute() as ipr:
        for _family, af in FAMILIES:
            for route in ipr.get_routes(family=af, table=LOCAL_TABLE):
                if route.get("type") != RTN_LOCAL:
                    continue
                dst = route.get_attr("RTA_DST")
                if dst:
                    prefixes.append(f"{dst}/{route.get('dst_len')}")
    return prefixes
