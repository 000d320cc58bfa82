"""L7 resilience benchmark: kube-proxy's DNAT (the STAND-IN, sandbox/kubeproxy.py) vs lightpath (the agent's
redirect + a real Envoy with the original Lightpath's defaults), side by side in one run, with failing and
slow backends -- the thesis' comparison (issue 16) reproduced on this machine.

Run as root: ``.venv/bin/python -m bench.l7_bench [--rate 100] [--duration 8] [--json out.json]``.

One node (agent, Envoy, stand-in), three backend pods (tests/e2e/l7_backend.py) and a client pod. Three
Services on the same backends: ``kp`` unlabelled (served by the stand-in's DNAT), ``lp`` labelled (lightpath,
default LEAST_REQUEST) and ``lprr`` labelled with ``lb-policy: ROUND_ROBIN``. An open-loop generator in the
client pod sends ``rate`` requests per second, each on a NEW connection, and measures latency from each
request's INTENDED send time (so a stall is not hidden by the generator waiting). Cases: (a) steady;
(b) one backend of three answers 500 for a third of its requests; (c) one backend answers 50 ms late;
(d) one backend is killed 1 s into the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandbox.kubeproxy import StandinSync
from sandbox.node.netns import run_in_netns
from sandbox.node.traffic import wait_until
from shared import constants as c

IPS = {"kp": "10.96.0.70", "lp": "10.96.0.71", "lprr": "10.96.0.72"}
PORT = 8090


def open_loop(ip: str, rate: float, duration: float, timeout: float = 2.0) -> list[tuple[float, int | None]]:
    """(latency from the intended send time, status or None) per request; runs inside the client pod."""
    n = int(rate * duration)
    start = time.monotonic() + 0.05
    results: list[tuple[float, int | None]] = [(0.0, None)] * n

    def one(i: int) -> None:
        intended = start + i / rate
        delay = intended - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        status: int | None = None
        try:
            conn = http.client.HTTPConnection(ip, 80, timeout=timeout)
            conn.request("GET", "/")
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            conn.close()
        except (OSError, http.client.HTTPException):
            status = None
        results[i] = (time.monotonic() - intended, status)

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(one, range(n)))
    return results


def summary(results: list[tuple[float, int | None]]) -> dict[str, Any]:
    lat = sorted(x for x, _ in results)
    errors = sum(1 for _, s in results if s != 200)
    return {"requests": len(results), "errors": errors, "error_pct": round(100 * errors / max(1, len(results)), 2),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "avg_ms": round(1000 * statistics.mean(lat), 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)}


def run(rate: float, duration: float) -> dict[str, Any]:
    from tests.e2e.envoynode import envoy_node
    from tests.e2e.test_l7 import backend

    out: dict[str, Any] = {"rate": rate, "duration_s": duration, "cases": {}}
    cases = {"a steady": [(), (), ()], "b one backend 33% 500": [("--fail-every", "3"), (), ()],
             "c one backend +50 ms": [("--delay", "0.05"), (), ()], "d one backend killed at 1 s": [(), (), ()]}
    with tempfile.TemporaryDirectory(prefix="lightpath-l7-bench-") as tmp:
        for case, args in cases.items():
            workdir = Path(tmp) / case.split()[0]
            workdir.mkdir()
            with envoy_node(workdir, pods=4) as node, \
                    StandinSync(node.api.api_client(), node.topo.node.name, min_sync_period=0.2) as standin:
                for i, a in enumerate(args):
                    backend(node, i, "--port", str(PORT), *a)
                for name, ip in IPS.items():
                    labels = {} if name == "kp" else {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
                    annotations = {"config.lightpath.cloud/lb-policy": "ROUND_ROBIN"} if name == "lprr" else {}
                    body = {"metadata": {"name": name, "namespace": "shop", "labels": labels, "annotations": annotations},
                            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [
                                {"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP", "appProtocol": "http"}]}}
                    node.core.create_namespaced_service("shop", body, _preload_content=False)
                    node.endpoints(name, {"http": PORT}, [0, 1, 2])
                standin.wait_for(lambda rs: f"{IPS['kp']} . tcp . 80 : goto service-" in rs, timeout=20)
                wait_until(lambda: node.proxy()["in_sync"] and all(
                    k["served"] for r in node.proxy()["services"] for k in r["keys"] if r["service"] != "shop/kp"),
                    timeout=30, what="lightpath serving")
                out["cases"][case] = {}
                for idx, (name, ip) in enumerate(IPS.items()):
                    killer = None
                    if case.startswith("d"):
                        victim_port = PORT + 1 + idx  # a fresh victim in pod 0 for each path
                        victim = backend(node, 0, "--port", str(victim_port))
                        node.endpoints(name, {"http": PORT}, [1, 2])
                        node.slice(name, {"http": victim_port}, [{"pod": 0}], name=f"{name}-victim")
                        pod0 = f"{node.topo.pod_ips[0]}:{victim_port}"
                        if name == "kp":
                            standin.wait_for(lambda rs, pod0=pod0: pod0 in rs, timeout=20)
                        else:
                            wait_until(lambda name=name: node.proxy(name)["services"][0]["keys"][0]["endpoints"] == 3
                                       and node.proxy()["in_sync"], timeout=20, what="the victim in Envoy")
                        killer = threading.Timer(1.0, victim.stop)
                        killer.start()
                    results = run_in_netns(node.topo.pods[3].name, open_loop, ip, rate, duration, timeout=duration + 120)
                    if killer is not None:
                        killer.join()
                    out["cases"][case][name] = summary(results)
                    print(f"{case:28} {name:5} {out['cases'][case][name]}", file=sys.stderr, flush=True)
    return out


def table(out: dict[str, Any]) -> str:
    lines = [f"open loop, {out['rate']:g} req/s for {out['duration_s']:g} s per cell, a new connection per request; "
             "latency from the intended send time (ms)", "",
             "| case | path | requests | errors | p50 | avg | p99 |", "|---|---|---|---|---|---|---|"]
    names = {"kp": "kube-proxy stand-in (DNAT)", "lp": "lightpath (least request)", "lprr": "lightpath (round robin)"}
    for case, paths in out["cases"].items():
        for name, r in paths.items():
            lines.append(f"| {case} | {names[name]} | {r['requests']} | {r['errors']} ({r['error_pct']} %) | "
                         f"{r['p50_ms']} | {r['avg_ms']} | {r['p99_ms']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out = run(a.rate, a.duration)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    print(table(out))


if __name__ == "__main__":
    main()
