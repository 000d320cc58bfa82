"""End-to-end data path benchmark: client -> (a) kube-proxy stand-in DNAT vs (b) lightpath redirect + Envoy.

Run as root: ``.venv/bin/python -m bench.e2e_bench [--duration 10] [--fresh 500] [--json out.json]``.
Prints the markdown table of docs/performance.md ("End-to-end").

One run, one topology (sandbox.node.netns: a node and two pods, nothing on the host's network), two Services
side by side on the same backend:
- ``direct`` 10.96.0.20:80, unlabelled: the kube-proxy STAND-IN's nftables DNAT (sandbox.kubeproxy);
- ``envoy``  10.96.0.10:80, labelled, appProtocol http: the redirector's nftables backend (redirector.nft)
  REDIRECTs it to the node-local Envoy, programmed over Delta ADS by the product's control plane
  (controlplane: http_connection_manager, EDS cluster).
The backend is a second Envoy in the backend pod answering 200 "ok" itself (direct_response): a C++ server
that costs next to nothing, so the figures are about the path, not the application.
Measured from the client pod: wrk (HTTP/1.1 keep-alive) at 1 and 50 connections -> p50/p99 and req/s; and
new-connection latency (connect + one request + close, Python client, both paths interleaved) p50/p99, plus
the very first request of each path (cold: Envoy has no upstream connection yet; one sample).
Both Envoys run with --concurrency 1; the machine has as many cores as ``nproc`` says, shared by wrk, both
Envoys and the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane.embedded import EmbeddedControlPlane
from redirector.model import Key
from sandbox import kubeproxy
from sandbox.node.envoy_process import ENVOY_BIN, EnvoyProcess
from sandbox.node.netns import NetNS, Topology, run_in_netns
from shared import constants as c

DIRECT_IP, ENVOY_IP, BACKEND_PORT = "10.96.0.20", "10.96.0.10", 8080
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def service(name: str, ip: str, labelled: bool) -> dict[str, Any]:
    labels = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME} if labelled else {}
    return {"metadata": {"name": name, "namespace": "bench", "labels": labels},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http", "targetPort": BACKEND_PORT}]}}


def endpoint_slice(name: str, backend_ip: str) -> dict[str, Any]:
    return {"metadata": {"name": f"{name}-1", "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": [{"addresses": [backend_ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}]}


def backend_bootstrap() -> dict[str, Any]:
    """A static Envoy that answers every request with 200 "ok" (no upstream)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "backend",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"static_resources": {"listeners": [{
        "name": "backend", "address": {"socket_address": {"address": "0.0.0.0", "port_value": BACKEND_PORT}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }]}}


def _redirect(keys: list[Key]) -> None:
    from redirector.nft import NftBackend  # in the forked child, inside the node namespace

    NftBackend().ensure(keys)


def _http_ok(ip: str, port: int) -> bool:
    with socket.create_connection((ip, port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")


def _read_response(s: socket.socket) -> None:
    """Until the whole response (headers + Content-Length body) is in: not until the server closes, which
    Envoy delays by its delayed_close_timeout (1 s) waiting for the client to close first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed mid-response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk


def _fresh(targets: list[str], rounds: int) -> dict[str, list[float]]:
    """Interleaved: one new connection per request, per target in turn (drift hits both alike)."""
    out: dict[str, list[float]] = {t: [] for t in targets}
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(rounds):
        for ip in targets:
            t0 = time.perf_counter()
            with socket.create_connection((ip, 80), timeout=5) as s:
                s.sendall(request)
                _read_response(s)
            out[ip].append(time.perf_counter() - t0)
    return out


def wrk(pod: NetNS, ip: str, connections: int, duration: int) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", f"http://{ip}/"]
    return parse_wrk(pod.run(argv, timeout=duration + 60).stdout)


def parse_wrk(out: str) -> dict[str, Any]:
    """p50/p99 (seconds), req/s and errors from ``wrk --latency`` output."""
    lat = {m[1]: float(m[2]) * UNITS[m[3]] for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"p50": lat.get("50"), "p99": lat.get("99"), "rps": float(rps[1]) if rps else None,
            "errors": (errors[1] if errors else "") + (f" non-2xx {non2xx[1]}" if non2xx else ""), "raw": out}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(duration: int, fresh_rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"duration_s": duration, "fresh_rounds": fresh_rounds, "nproc": os.cpu_count(),
                               "loadavg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="lightpath-e2e-bench-") as tmp, Topology(pods=2, prefix="lpbench") as topo:
        backend, client = topo.pods
        boot = Path(tmp) / "backend.json"
        boot.write_text(json.dumps(backend_bootstrap()))
        backend.popen([str(ENVOY_BIN), "-c", str(boot), "--concurrency", "1", "--base-id", str(os.getpid() % 100000 * 100 + 99),
                       "--log-level", "warning", "--log-path", str(Path(tmp) / "backend.log")],
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        services = [service("direct", DIRECT_IP, False), service("envoy", ENVOY_IP, True)]
        slices = [endpoint_slice(s["metadata"]["name"], topo.pod_ips[0]) for s in services]
        kubeproxy.apply(topo.node.name, kubeproxy.standin_ruleset(services, slices))
        run_in_netns(topo.node.name, _redirect, [Key(4, ENVOY_IP, 80)])
        plane = EmbeddedControlPlane("bench-node", [services[1]], slices, ipv6=False).start(Path(tmp) / "xds.sock")
        envoy = EnvoyProcess(topo.node, Path(tmp) / "envoy", xds_socket=Path(tmp) / "xds.sock", node_id="bench-node").start()
        if not plane.wait_in_sync(30):
            raise RuntimeError("Envoy did not ACK the control plane's configuration")
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if run_in_netns(client.name, _http_ok, topo.pod_ips[0], BACKEND_PORT):
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("backend Envoy did not answer")
                time.sleep(0.05)
            # The very first request of each path: Envoy has no upstream connection yet.
            first = run_in_netns(client.name, _fresh, [DIRECT_IP, ENVOY_IP], 1)
            results["first_request_s"] = {"direct": first[DIRECT_IP][0], "envoy": first[ENVOY_IP][0]}
            assert envoy.counter("cluster.bench_envoy_80_ipv4.upstream_rq_total") == 1, "the envoy path did not go through Envoy"
            fresh = run_in_netns(client.name, _fresh, [DIRECT_IP, ENVOY_IP], fresh_rounds, timeout=600)
            results["fresh"] = {name: {"p50": pct(fresh[ip], 0.5), "p99": pct(fresh[ip], 0.99), "mean": statistics.mean(fresh[ip])}
                                for name, ip in (("direct", DIRECT_IP), ("envoy", ENVOY_IP))}
            results["wrk"] = {}
            for conns in (1, 50):
                for name, ip in (("direct", DIRECT_IP), ("envoy", ENVOY_IP)):
                    wrk(client, ip, conns, 2)  # warm-up
                    r = wrk(client, ip, conns, duration)
                    results["wrk"][f"{name}/{conns}"] = {k: v for k, v in r.items() if k != "raw"}
            results["envoy_upstream_rq_total"] = envoy.counter("cluster.bench_envoy_80_ipv4.upstream_rq_total")
            results["loadavg_after"] = os.getloadavg()[0]
        finally:
            envoy.stop()
            plane.stop()
    return results


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f} ms"


def table(r: dict[str, Any]) -> str:
    rows = ["| path | connections | p50 | p99 | req/s | errors |", "|---|---|---|---|---|---|"]
    for conns in (1, 50):
        for name, label in (("direct", "(a) stand-in DNAT"), ("envoy", "(b) redirect + Envoy")):
            w = r["wrk"][f"{name}/{conns}"]
            rows.append(f"| {label} | {conns} | {ms(w['p50'])} | {ms(w['p99'])} | {w['rps']:.0f} | {w['errors'] or 'none'} |")
    for name, label in (("direct", "(a) stand-in DNAT"), ("envoy", "(b) redirect + Envoy")):
        f = r["fresh"][name]
        rows.append(f"| {label} | new connection per request | {ms(f['p50'])} | {ms(f['p99'])} | - | - |")
    lines = ["\n".join(rows), ""]
    for conns in (1, 50):
        d, e = r["wrk"][f"direct/{conns}"]["p50"], r["wrk"][f"envoy/{conns}"]["p50"]
        if d and e:
            lines.append(f"- {conns} connection(s): DNAT p50 is {100 * (e - d) / e:.0f} % lower than redirect + Envoy "
                         f"(thesis: ~61 %); req/s ratio Envoy/DNAT "
                         f"{r['wrk'][f'envoy/{conns}']['rps'] / r['wrk'][f'direct/{conns}']['rps']:.2f}")
    lines.append(f"- machine: {r['nproc']} CPUs, load average {r['loadavg_before']:.2f} before, {r['loadavg_after']:.2f} after; "
                 f"wrk {r['duration_s']} s per run, {r['fresh_rounds']} new connections per path")
    fr = r["first_request_s"]
    lines.append(f"- first request of each path (cold, one sample): DNAT {ms(fr['direct'])}, Envoy {ms(fr['envoy'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default: 10)")
    p.add_argument("--fresh", type=int, default=500, help="new-connection requests per path (default: 500)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    results = run(args.duration, args.fresh)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
