"""The kernel's own answer for migrated Services that have nowhere to send a new connection.

kube-proxy rejects a Service with no endpoints (the client gets "connection refused" at once; the upstream
e2e test "should be rejected when no endpoints exist") and drops traffic for a Local traffic policy with no
endpoint on this node. A labelled Service is served by nobody but us, and Envoy can only accept and then
close; so the agent keeps a small table of its own, ``inet <table>-block``, whose filter chains run before
every NAT (priority -120: before our redirect at -110 and kube-proxy's DNAT at -100) and answer those keys
in the kernel: ``reject with tcp reset`` or ``drop``, for new connections only. The control plane decides
which keys (``ServiceResources.blocked``, labelled Services only); this module only writes the kernel, in
one atomic transaction per change. The table is absent whenever nothing is blocked. nftables backend only.

The same table does kube-proxy's ``cluster-ips-check`` for the ClusterIPs of labelled Services, which
kube-proxy no longer knows (it would DROP their traffic as "unallocated"): a new connection still addressed
to such a ClusterIP AFTER every DNAT (our redirect took the exposed ports) is for a port or protocol the
Service does not expose, and is rejected (``reject``: ICMP port unreachable, "connection refused"), as
kube-proxy rejects invalid ports of the ClusterIPs it serves. Post-DNAT means the forward hook and the
output hook at priority -95 (after our -110 and kube-proxy's -100); the forward chain runs at -115, before
kube-proxy's drop at -110. Exposed ports whose redirect is not installed yet (Envoy has not ACKed) are
exempt: their traffic is dropped by kube-proxy and retried by the client, not refused.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping
from typing import Any

from redirector.model import Key

log = logging.getLogger(__name__)
PRIORITY = -120
CHECK_FORWARD_PRIORITY = -115  # before kube-proxy's filter-forward (-110), which would drop
CHECK_OUTPUT_PRIORITY = -95  # after every output DNAT (ours -110, kube-proxy's -100)


def _elements(keys: list[Key]) -> str:
    items = sorted(f"{k.ip} . {k.port}" if k.ip is not None else str(k.port) for k in keys)
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def _exposed(keys: list[Key], family: int) -> str:
    items = sorted(f"{k.ip} . tcp . {k.port}" for k in keys if k.family == family and k.ip is not None)
    return f" elements = {{ {', '.join(items)} }};" if items else ""


def blocks_script(table: str, blocked: Mapping[Key, str], exposed: Collection[Key] = ()) -> str:
    """The nft script that makes the kernel hold exactly ``blocked`` and the ClusterIP check of ``exposed``
    (pure). Deletes the table when both are empty."""
    head = f"add table inet {table}\ndelete table inet {table}\n"
    if not blocked and not exposed:
        return head
    sets: list[str] = []
    rules: list[str] = []
    checks: list[str] = []
    for verdict, action in (("reject", "reject with tcp reset"), ("drop", "drop")):
        for family, ipf, addr in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
            keys = [k for k, v in blocked.items() if v == verdict and k.family == family and k.ip is not None]
            ports = [k for k, v in blocked.items() if v == verdict and k.family == family and k.ip is None]
            name = f"{verdict}{family}"
            sets.append(f"\tset {name} {{ type {addr} . inet_service;{_elements(keys)} }}")
            sets.append(f"\tset {name}np {{ type inet_service;{_elements(ports)} }}")
            rules.append(f"ct state new {ipf} daddr . tcp dport @{name} {action}")
            nfproto = "ipv4" if family == 4 else "ipv6"
            rules.append(f"ct state new fib daddr type local meta nfproto {nfproto} tcp dport @{name}np {action}")
    exposed = list(exposed)
    for family, ipf, addr in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
        ips = sorted({str(k.ip) for k in exposed if k.family == family and k.ip is not None})
        items = f" elements = {{ {', '.join(ips)} }};" if ips else ""
        sets.append(f"\tset clusterips{family} {{ type {addr};{items} }}")
        sets.append(f"\tset exposed{family} {{ type {addr} . inet_proto . inet_service;{_exposed(exposed, family)} }}")
        checks.append(f"ct state new {ipf} daddr @clusterips{family} {ipf} daddr . meta l4proto . th dport "
                      f"!= @exposed{family} reject")
    chains = [f"\tchain {hook} {{\n\t\ttype filter hook {hook} priority {PRIORITY}; policy accept;\n"
              + "".join(f"\t\t{r}\n" for r in rules) + "\t}" for hook in ("prerouting", "output")]
    chains += [f"\tchain {name} {{\n\t\ttype filter hook {hook} priority {prio}; policy accept;\n"
               + "".join(f"\t\t{r}\n" for r in checks) + "\t}"
               for name, hook, prio in (("forward-check", "forward", CHECK_FORWARD_PRIORITY),
                                        ("output-check", "output", CHECK_OUTPUT_PRIORITY))]
    return head + f"table inet {table} {{\n" + "\n".join(sets + chains) + "\n}\n"


class KernelBlocks:
    """Writes ``blocks_script`` with libnftables in the agent's network namespace, only when it changes."""

    def __init__(self, table: str) -> None:
        import nftables  # type: ignore[import-untyped,unused-ignore]  # Debian python3-nftables

        self.table = table
        self._nft: Any = nftables.Nftables()
        self._lock = threading.Lock()
        self.applied: dict[Key, str] = {}
        self.exposed: frozenset[Key] = frozenset()
        self.errors = 0

    def apply(self, blocked: Mapping[Key, str], exposed: Collection[Key] = frozenset()) -> None:
        with self._lock:
            if dict(blocked) == self.applied and frozenset(exposed) == self.exposed:
                return
            rc, _out, err = self._nft.cmd(blocks_script(self.table, blocked, exposed))
            if rc != 0:
                self.errors += 1
                log.error("could not program the kernel's answers for Services without endpoints",
                          extra={"table": self.table, "error": str(err)[:500]})
                return
            changed = dict(blocked) != self.applied
            self.applied, self.exposed = dict(blocked), frozenset(exposed)
            if changed:
                log.info("kernel answers for Services without endpoints", extra={
                    "reject": sum(v == "reject" for v in blocked.values()),
                    "drop": sum(v == "drop" for v in blocked.values())})

    def cleanup(self) -> None:
        self.apply({})
