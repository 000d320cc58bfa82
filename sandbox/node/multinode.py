"""Several sandbox nodes on one network: each a ``Topology`` (its node netns and pods) with its own pod range,
joined by a bridge in a "fabric" netns, with routes to the other nodes' pod ranges -- so an Envoy or a
kube-proxy stand-in on one node reaches pods on every node, as on a real cluster with a flat pod network.

    fabric netns: br0 ── up0 ─ uplink (node 0: 192.168.50.10, fd00:50::10) ── veth0..N ── pods 10.244.0.x
                      ├─ up1 ─ uplink (node 1: 192.168.50.11, fd00:50::11) ── ...        pods 10.244.1.x
                      └─ up2 ─ ...

Node ``i`` routes 10.244.<k>.0/24 and fd00:10:244:<k>::/64 via node ``k``'s uplink address. The service
ranges stay local to each node (a ClusterIP is only answered by a node's own rules, as with kube-proxy).
"""

from __future__ import annotations

import os
from itertools import count
from types import TracebackType

from sandbox.node.netns import NetNS, Topology

_counter = count()
UPLINK = "uplink"


def uplink_ip(index: int) -> str:
    return f"192.168.50.{10 + index}"


def uplink_ip6(index: int) -> str:
    return f"fd00:50::{10 + index:x}"


class MultiNode:
    """``nodes`` Topologies of ``pods`` pods each, connected (see the module docstring). A context manager."""

    def __init__(self, nodes: int = 3, pods: int = 2, *, prefix: str = "lpm") -> None:
        if not 1 <= nodes <= 16:
            raise ValueError(f"nodes must be in 1..16, got {nodes}")
        self.fabric = NetNS(f"{prefix}-{os.getpid()}-{next(_counter)}-fabric")
        self.nodes = [Topology(pods, prefix=f"{prefix}{i}", subnet=i) for i in range(nodes)]

    def __enter__(self) -> MultiNode:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for topo in reversed(self.nodes):
            topo.close()
        self.fabric.delete()

    def _build(self) -> None:
        self.fabric.create()
        for topo in self.nodes:
            topo.__enter__()
        fabric = ["link add br0 type bridge", "link set br0 up"]
        for i, topo in enumerate(self.nodes):
            fabric += [f"link add up{i} type veth peer name {UPLINK} netns {topo.node.name}",
                       f"link set up{i} master br0", f"link set up{i} up"]
        self.fabric.run(["ip", "-batch", "-"], input="\n".join(fabric) + "\n")
        for i, topo in enumerate(self.nodes):
            cmds = [f"addr add {uplink_ip(i)}/24 dev {UPLINK}", f"addr add {uplink_ip6(i)}/64 dev {UPLINK} nodad",
                    f"link set {UPLINK} up"]
            for k, other in enumerate(self.nodes):
                if k != i:
                    cmds += [f"route add 10.244.{other.subnet}.0/24 via {uplink_ip(k)} dev {UPLINK}",
                             f"route add fd00:10:244:{other.subnet:x}::/64 via {uplink_ip6(k)} dev {UPLINK}"]
            topo.node.run(["ip", "-batch", "-"], input="\n".join(cmds) + "\n")
