"""What keeping the client's source address costs (--preserve-source-ip, docs/conformance.md row 6).

Run as root: ``.venv/bin/python -m bench.transparent_bench [--connects 500] [--json out.json]``.

One node (the agent with --preserve-source-ip on, a real Envoy), one backend pod (TCP echo), one client pod.
Side by side, interleaved in one run, a new connection each time, connect + the backend's first line:
``direct`` (client pod -> backend pod, no Service: the floor), ``ordinary`` (an externalTrafficPolicy Cluster
NodePort: our redirect, Envoy's ordinary listener, the backend sees the node) and ``transparent`` (the same
with externalTrafficPolicy Local: the transparent listener, original_src, the reply-mark route; the backend
sees the client). The script checks which address each backend saw.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sandbox.node.netns import run_in_netns
from sandbox.node.traffic import tcp_request, wait_until


def _connects(ip: str, port: int, n: int) -> list[float]:
    """In the client's netns: ``n`` connect + first-line exchanges, each on a new connection (ms)."""
    import socket

    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    out = []
    for _ in range(n):
        started = time.perf_counter()
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect((ip, port))
            if not sock.makefile("rb").readline():
                raise RuntimeError(f"{ip}:{port} closed without a line")
        out.append((time.perf_counter() - started) * 1000)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered), 3), "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 3),
            "mean_ms": round(statistics.fmean(ordered), 3)}


def run(connects: int) -> dict[str, Any]:
    from tests.e2e.envoynode import CLUSTER_IPS, envoy_node

    with tempfile.TemporaryDirectory() as tmp, envoy_node(Path(tmp), agent_args=["--preserve-source-ip", "on"]) as node:
        node.serve(0, "tcp", 4, port=8081)
        for name, port, ip, etp in (("ordinary", 30082, CLUSTER_IPS[0], "Cluster"), ("transparent", 30081, "10.96.0.11", "Local")):
            node.service(name, [{"name": "tcp", "port": 81, "targetPort": 8081, "nodePort": port}], ips=(ip,),
                         type="NodePort", externalTrafficPolicy=etp)
            node.slice(name, {"tcp": 8081}, [{"pod": 0}])
        client, node_ip = node.topo.pod_ips[2], node.topo.node_ip
        cases = {"direct": (node.topo.pod_ips[0], 8081), "ordinary": (node_ip, 30082), "transparent": (node_ip, 30081)}
        seen = {}
        for case, (ip, port) in cases.items():
            wait_until(lambda ip=ip, port=port: tcp_request(node.topo.pods[2], ip, port), timeout=20, what=case)
            seen[case] = tcp_request(node.topo.pods[2], ip, port)["peer"][0]
        wait_until(lambda: tcp_request(node.topo.pods[2], node_ip, 30081)["peer"][0] == client, timeout=20,
                   what="the transparent listener in the kernel")
        seen["transparent"] = tcp_request(node.topo.pods[2], node_ip, 30081)["peer"][0]
        samples: dict[str, list[float]] = {case: [] for case in cases}
        rounds = 10
        for _ in range(rounds):  # interleaved: the machine's noise hits every case alike
            for case, (ip, port) in cases.items():
                samples[case] += run_in_netns(node.topo.pods[2].name, _connects, ip, port, connects // rounds,
                                              timeout=120)
    return {"connects_per_case": connects, "client": client,
            "backend_saw": seen, "cases": {case: _summary(s) for case, s in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.connects)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
