"""The node-local addresses the DNAT rules send Service traffic to, kept on ``lo``. The addresses and their
attributes are decided by pure functions (``check_address``, ``specs``); ``LoopbackAddresses`` is the thin
pyroute2 shell that adds, lists and removes them.

WHY an address of our own on lo: DNAT needs a destination the node owns whatever the CNI did to the pod's
veth (Calico, Cilium chaining and the AWS VPC CNI leave its host side without an address, so REDIRECT in
prerouting drops the packet). Linux is weak-host: an address on lo is local for packets arriving on every
interface, and the proxy's 0.0.0.0/[::] listener accepts it.

WHY these attributes: the node's own traffic must never pick our address as its source (a kubelet probe to
a pod behind an addressless veth would otherwise leave from 169.254.16.66 instead of the node IP). IPv4
gets ``scope host``, which source selection for any routed destination skips; IPv6 has no such scope for a
ULA, so it is added deprecated (``preferred_lft 0``, RFC 6724 rule 3) and without DAD (``nodad``: usable
at once). Both still accept traffic.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from redirector.model import BackendError, Family
from shared import constants as c
from shared.netns import NETNS_DIR, enter_fd

log = logging.getLogger(__name__)
T = TypeVar("T")
DEVICE = "lo"
RT_SCOPE_HOST = 254  # include/uapi/linux/rtnetlink.h
IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h


def check_address(text: str, family: Family) -> str:
    """``text`` as a canonical address of ``family`` the DNAT rules may target, else ValueError saying why."""
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv{family} address") from None
    if addr.version != family:
        raise ValueError(f"{text!r} is not an IPv{family} address")
    if addr.is_loopback:
        raise ValueError(f"{addr} is a loopback address: forwarded pod traffic reaches it only with "
                         "route_localnet=1 (the CVE-2020-8558 class of problem); use e.g. 169.254.16.66")
    if addr.is_unspecified or addr.is_multicast or (family == 4 and str(addr) == "255.255.255.255"):
        raise ValueError(f"{addr} cannot be a unicast destination")
    if family == 6 and addr.is_link_local:
        raise ValueError(f"{addr} is link-local: it is scoped to one interface, not the node; use a ULA (fd00::/8)")
    return addr.compressed


@dataclass(frozen=True)
class AddressSpec:
    """One address as netlink wants it (``ip addr add`` arguments)."""

    family: Family
    address: str

    @property
    def prefixlen(self) -> int:
        return 32 if self.family == 4 else 128

    def netlink(self) -> dict[str, Any]:
        if self.family == 4:
            return {"address": self.address, "prefixlen": 32, "family": socket.AF_INET, "scope": RT_SCOPE_HOST}
        return {"address": self.address, "prefixlen": 128, "family": socket.AF_INET6, "flags": IFA_F_NODAD,
                "preferred_lft": 0}


def specs(addresses: Iterable[tuple[Family, str]]) -> tuple[AddressSpec, ...]:
    """The addresses to keep on lo, validated and canonical, in family order."""
    return tuple(sorted({AddressSpec(family, check_address(text, family)) for family, text in addresses},
                        key=lambda s: (s.family, s.address)))


class LoopbackAddresses:
    """Our addresses on lo of ONE network namespace: the caller's (``netns`` None: the namespace of the thread
    constructing it, as libnftables binds its socket) or /run/netns/<netns> (tests, benchmarks).

    Every call opens its pyroute2 socket in a fresh thread that first enters that namespace: pyroute2 0.9
    keeps per-thread sockets, and setns() moves only the calling thread.
    """

    def __init__(self, addresses: Iterable[tuple[Family, str]], *, netns: str | None = None,
                 timeout: float = 10.0) -> None:
        self.specs = specs(addresses)
        self.timeout = timeout
        path = NETNS_DIR / netns if netns else "/proc/thread-self/ns/net"
        self._ns = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._finalizer = weakref.finalize(self, os.close, self._ns)

    def ensure(self) -> list[str]:
        """Add whichever of our addresses lo lacks; the ones added. An IPv6 address is skipped (logged) when
        IPv6 is disabled on lo: no IPv6 packet can arrive to be redirected there."""
        return self._call(_ensure, self.specs)

    def present(self) -> list[str]:
        """Which of our addresses lo holds now."""
        return self._call(_present, self.specs)

    def remove(self) -> list[str]:
        """Remove our addresses from lo (absent ones are no error); the ones removed."""
        return self._call(_remove, self.specs)

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        result: list[T] = []
        error: list[BaseException] = []

        def work() -> None:
            try:
                enter_fd(self._ns, "the backend's network namespace")
                result.append(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                error.append(exc)

        thread = threading.Thread(target=work, name="lightpath-addresses", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise BackendError(f"netlink on {DEVICE} did not answer within {self.timeout}s")
        if error:
            if isinstance(error[0], BackendError):
                raise error[0]
            raise BackendError(f"addresses on {DEVICE}: {type(error[0]).__name__}: {error[0]}") from error[0]
        return result[0]


def _lo(ipr: Any) -> int:
    found = ipr.link_lookup(ifname=DEVICE)
    if not found:
        raise BackendError(f"no {DEVICE} device in this network namespace")
    return int(found[0])


def _held(ipr: Any, index: int) -> set[tuple[int, str]]:
    return {(int(a.get("prefixlen")), ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).compressed)
            for a in ipr.get_addr(index=index)}


def _ensure(wanted: tuple[AddressSpec, ...]) -> list[str]:
    from pyroute2 import IPRoute  # type: ignore[import-untyped,unused-ignore]
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped,unused-ignore]

    added: list[str] = []
    with IPRoute() as ipr:
        index = _lo(ipr)
        held = _held(ipr, index)
        for spec in wanted:
            if (spec.prefixlen, spec.address) in held:
                continue
            try:
                ipr.addr("add", index=index, **spec.netlink())
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:  # added by someone else since we listed
                    continue
                if spec.family == 6 and exc.code == errno.EACCES:  # IPv6 disabled on lo
                    log.warning("IPv6 is disabled on lo: the IPv6 redirect address is not added",
                                extra={"address": spec.address})
                    continue
                raise BackendError(f"adding {spec.address}/{spec.prefixlen} to {DEVICE}: {exc}") from exc
            added.append(f"{spec.address}/{spec.prefixlen}")
    return added


def _present(wanted: tuple[AddressSpec, ...]) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        held = _held(ipr, _lo(ipr))
    return [f"{s.address}/{s.prefixlen}" for s in wanted if (s.prefixlen, s.address) in held]


def _remove(wanted: tuple[AddressSpec, ...]) -> list[str]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    removed: list[str] = []
    with IPRoute() as ipr:
        index = _lo(ipr)
        held = _held(ipr, index)
        for spec in wanted:
            if (spec.prefixlen, spec.address) not in held:
                continue
            nl = spec.netlink()
            try:
                ipr.addr("del", index=index, address=spec.address, prefixlen=spec.prefixlen, family=nl["family"])
            except NetlinkError as exc:
                if exc.code == errno.EADDRNOTAVAIL:
                    continue
                raise BackendError(f"removing {spec.address}/{spec.prefixlen} from {DEVICE}: {exc}") from exc
            removed.append(f"{spec.address}/{spec.prefixlen}")
    return removed


def redirect_target(mode: str, address4: str, address6: str) -> tuple[str, str]:
    """Validate a backend's redirect mode and return its DNAT addresses in canonical text (both backends'
    rules must compare equal to what the kernel lists back)."""
    if mode not in c.REDIRECT_MODES:
        raise ValueError(f"redirect mode must be one of {', '.join(c.REDIRECT_MODES)}, not {mode!r}")
    return check_address(address4, 4), check_address(address6, 6)
