"""REDIRECT vs DNAT-to-our-address, in the addressed and the addressless (Calico-style) topology.

Run as root: ``.venv/bin/python -m bench.redirect_primitive_bench [--connects 300] [--backend nftables]``.
Prints the markdown table of docs/performance.md ("Redirect primitive") and docs/redirector.md.
``--scale 10,1000,10000``: instead, DNAT in the addressless topology with that many dual-stack Services
programmed (20,000 keys at 10,000), the measured ClusterIP among them: is the connect time flat?

For each topology (``sandbox.node.netns.Topology``, addressless or not) and each mode of the redirector's backend
(``--redirect-mode redirect|dnat``), one ClusterIP per family is programmed and a stand-in proxy (the echo
server, reporting SO_ORIGINAL_DST) listens on the node's port 1666. From a pod (prerouting) and from the node
(output), ``--connects`` sequential TCP connections per family: connect() time (the handshake: the kernel's
NAT and routing, no Python on the server side), then the proxy's JSON line is read to check the original
destination, then close. A connection that gets no answer within 1 s counts as lost; after 3 lost in a row
the cell stops (a dropped path would take ``--connects`` seconds otherwise).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from typing import Any

from redirector.model import Key
from sandbox.node.netns import NetNS, Topology, run_in_netns
from sandbox.node.traffic import tcp_listener

CLUSTER = {4: "10.96.0.10", 6: "fd00:10:96::a"}
PORT = 80


def _connects(ip: str, port: int, n: int) -> dict[str, Any]:
    """In the source netns: ``n`` connections, their connect() times (ms) and the proxy's first replies."""
    times: list[float] = []
    lost = streak = 0
    local: list[Any] | None = None
    original_ok = 0
    for _ in range(n):
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            start = time.perf_counter()
            try:
                sock.connect((ip, port))
                elapsed = (time.perf_counter() - start) * 1000
                reply = json.loads(sock.makefile("rb").readline())
            except OSError:
                lost += 1
                streak += 1
                if streak >= 3:
                    break
                continue
        streak = 0
        times.append(elapsed)
        local = reply["local"]
        original_ok += reply["original_dst"] == [ip, port]
    return {"times": times, "lost": lost, "local": local, "original_ok": original_ok}


def backend(kind: str, topo: Topology, mode: str) -> Any:
    if kind == "nftables":
        from redirector.nft import NftBackend
        from shared.netns import entered

        with entered(topo.node.name):  # libnftables' sockets (and the address shell) bind this netns
            return NftBackend(mode=mode)
    from redirector.iptables import IptablesBackend

    return IptablesBackend(variant="nft", netns=topo.node.name, mode=mode)


def cell(source: NetNS, family: int, n: int) -> str:
    r = run_in_netns(source.name, _connects, CLUSTER[family], PORT, n, timeout=n * 2 + 30)
    done = len(r["times"])
    attempts = done + r["lost"]
    if not done:
        return f"**0/{attempts}** (connect times out)"
    q = statistics.quantiles(r["times"], n=100) if done >= 2 else r["times"] * 99
    host = r["local"][0] if family == 4 else f"[{r['local'][0]}]"
    return (f"{done}/{attempts}, p50 {q[49]:.3f} ms, p99 {q[98]:.3f} ms, at {host}; "
            f"original_dst ok {r['original_ok']}/{done}")


def many(n: int) -> set[Key]:
    """``n`` dual-stack Services on port 80, the measured ClusterIPs among them."""
    keys = {Key(4, CLUSTER[4], PORT), Key(6, CLUSTER[6], PORT)}
    for i in range(n - 1):
        keys |= {Key(4, f"10.97.{i // 250}.{i % 250 + 1}", PORT), Key(6, f"fd00:10:97::{i + 1:x}", PORT)}
    return keys


def scale(kind: str, sizes: list[int], connects: int) -> None:
    print("| Services (keys) | family | pod -> ClusterIP (prerouting) | node -> ClusterIP (output) |")
    print("|---|---|---|---|")
    with Topology(pods=1, prefix="lpb", addressless=True) as topo:
        proxies = [tcp_listener(topo.node, 1666, f, name="proxy") for f in (4, 6)]
        try:
            b = backend(kind, topo, "dnat")
            for n in sizes:
                keys = many(n)
                b.ensure(keys)
                for family in (4, 6):
                    pod, node = cell(topo.pods[0], family, connects), cell(topo.node, family, connects)
                    print(f"| {n:,} ({len(keys):,}) | IPv{family} | {pod} | {node} |", flush=True)
            b.cleanup()
        finally:
            for p in proxies:
                p.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--backend", choices=("nftables", "iptables"), default="nftables")
    parser.add_argument("--scale", default="", help="comma-separated Service counts: the DNAT scaling table")
    args = parser.parse_args()
    if args.scale:
        scale(args.backend, [int(x) for x in args.scale.split(",")], args.connects)
        return
    print("| topology | mode | family | pod -> ClusterIP (prerouting) | node -> ClusterIP (output) |")
    print("|---|---|---|---|---|")
    for addressless in (False, True):
        with Topology(pods=1, prefix="lpb", addressless=addressless) as topo:
            proxies = [tcp_listener(topo.node, 1666, f, name="proxy") for f in (4, 6)]
            try:
                for mode in ("redirect", "dnat"):
                    b = backend(args.backend, topo, mode)
                    b.ensure({Key(4, CLUSTER[4], PORT), Key(6, CLUSTER[6], PORT)})
                    for family in (4, 6):
                        pod, node = cell(topo.pods[0], family, args.connects), cell(topo.node, family, args.connects)
                        name = "addressless" if addressless else "addressed"
                        print(f"| {name} | {mode} | IPv{family} | {pod} | {node} |", flush=True)
                    b.cleanup()
            finally:
                for p in proxies:
                    p.stop()


if __name__ == "__main__":
    main()
