"""L7 resilience benchmark: kube-proxy's DNAT (the STAND-IN, sandbox/kubeproxy.py) vs lightpath (the agent's
redirect + a real Envoy with the original Lightpath's defaults), side by side in one run, with failing and
slow backends -- the thesis' comparison (issue 16) reproduced on this machine.

Run as root: ``.venv/bin/python -m bench.l7_bench [--rate 100] [--duration 6] [--fail-percent 30]
[--kill-at 1] [--unready-after 3] [--json out.json]``.

One node (agent, Envoy, stand-in), three backend pods (tests/e2e/l7_backend.py) and a client pod. Services on
the same backends: ``kp`` unlabelled (served by the stand-in's DNAT), ``lp`` labelled (lightpath, the original
Lightpath's defaults: LEAST_REQUEST, 2 retries), ``lprr`` labelled with ``lb-policy: ROUND_ROBIN``, ``lpnr``
with ``retry-enabled: "false"`` and ``outlier-detection-max-ejection-percent: "50"`` (what outlier detection
alone does: the default 10 % lets Envoy eject none of three hosts), and in case (d) ``lpej``, the defaults
but that 50 %. An open-loop generator in the client pod sends ``rate`` requests per second, each on a NEW
connection, and measures latency from each request's INTENDED send time (so a stall is not hidden by the
generator waiting). Cases: (a) steady; (b) one backend of three answers 500 for exactly ``fail-percent`` % of
its requests (3 of every 10 at 30); (c) one backend answers 50 ms late; (d) one backend is killed ``kill-at`` s
into the run and marked not ready in its EndpointSlice ``unready-after`` s later (what a readiness probe would
make the endpoints controller do: the only way the DNAT path stops choosing it). For (d): the failures, the
time from the kill to the last failure (by intended send time), and for lightpath the time from the kill to
Envoy's ejection of the dead host and the connection attempts it refused (Envoy's admin, sampled every 10 ms
in the node's netns).
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
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandbox.kubeproxy import StandinSync
from sandbox.node.netns import run_in_netns
from sandbox.node.traffic import wait_until
from shared import constants as c

IPS = {"kp": "10.96.0.70", "lp": "10.96.0.71", "lprr": "10.96.0.72", "lpnr": "10.96.0.73", "lpej": "10.96.0.74"}
_O = "config.lightpath.cloud/"
# The default max-ejection-percent (10) lets Envoy eject no host of three (it ejects while (ejected + 1) /
# hosts <= the percent); 50 lets it eject one: the ejection itself, with and without retries.
ANNOTATIONS: dict[str, dict[str, str]] = {
    "kp": {}, "lp": {}, "lprr": {_O + "lb-policy": "ROUND_ROBIN"},
    "lpnr": {_O + "retry-enabled": "false", _O + "outlier-detection-max-ejection-percent": "50"},
    "lpej": {_O + "outlier-detection-max-ejection-percent": "50"}}
NAMES = {"kp": "kube-proxy stand-in (DNAT)", "lp": "lightpath (least request)", "lprr": "lightpath (round robin)",
         "lpnr": "lightpath (least request, retries off, max-ejection-percent 50)",
         "lpej": "lightpath (least request, max-ejection-percent 50)"}
KILL_ONLY = ("lpej",)  # measured in case (d) only
PORT = 8090
Result = tuple[float, float, int | None]  # (intended send time, monotonic; latency from it; status or None)


def open_loop(ip: str, rate: float, duration: float, timeout: float = 2.0) -> list[Result]:
    """One Result per request; runs inside the client pod (CLOCK_MONOTONIC is the node's: comparable with the
    bench's own times)."""
    n = int(rate * duration)
    start = time.monotonic() + 0.05
    results: list[Result] = [(0.0, 0.0, None)] * n

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
        results[i] = (intended, time.monotonic() - intended, status)

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(one, range(n)))
    return results


def summary(results: list[Result]) -> dict[str, Any]:
    lat = sorted(x for _, x, _ in results)
    errors = sum(1 for _, _, s in results if s != 200)
    return {"requests": len(results), "errors": errors, "error_pct": round(100 * errors / max(1, len(results)), 2),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2), "avg_ms": round(1000 * statistics.mean(lat), 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)}


def kill_window(results: list[Result], killed: float, samples: list[tuple[float, int, int]] | None) -> dict[str, Any]:
    """Case (d): what the kill at ``killed`` (monotonic) cost until the dead backend stopped being chosen.
    ``samples``: Envoy's (time, ejections_active, upstream_cx_connect_fail) when they changed (lightpath)."""
    failed = [t - killed for t, _, s in results if s != 200]  # all of them: none is expected before the kill
    out: dict[str, Any] = {"failures": len(failed), "last_failure_s": round(max(failed), 3) if failed else None}
    if failed:  # what the clients saw: "none" is a refused or reset connection
        out["statuses"] = dict(sorted(Counter("none" if s is None else str(s) for _, _, s in results if s != 200).items()))
    if samples is not None:
        before = [cf for t, _, cf in samples if t <= killed]
        base = before[-1] if before else 0
        ejected = [t - killed for t, ej, _ in samples if ej > 0 and t >= killed]
        out["ejected_after_s"] = round(ejected[0], 3) if ejected else None
        out["refused_attempts"] = (samples[-1][2] - base) if samples else 0
    return out


def watch_envoy(admin_port: int, cluster: str, until: float, every: float = 0.01) -> list[tuple[float, int, int]]:
    """Runs in the node's netns: (monotonic, ejections_active, upstream_cx_connect_fail) of ``cluster`` each
    time they change, polled every ``every`` s until ``until``."""
    url = (f"http://127.0.0.1:{admin_port}/stats?filter=^cluster[.]{cluster}[.]"
           "(outlier_detection[.]ejections_active|upstream_cx_connect_fail)$")
    samples: list[tuple[float, int, int]] = []
    while time.monotonic() < until:
        now = time.monotonic()
        values = {"ejections_active": 0, "upstream_cx_connect_fail": 0}
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback admin only
                for line in resp.read().decode().splitlines():
                    name, _, value = line.partition(": ")
                    if value.strip().isdigit():
                        values[name.rsplit(".", 1)[-1]] = int(value)
        except OSError:
            pass
        sample = (now, values["ejections_active"], values["upstream_cx_connect_fail"])
        if not samples or sample[1:] != samples[-1][1:]:
            samples.append(sample)
        time.sleep(max(0.0, now + every - time.monotonic()))
    if samples:
        samples.append((time.monotonic(), *samples[-1][1:]))
    return samples


def run(rate: float, duration: float, fail_percent: int = 30, kill_at: float = 1.0,
        unready_after: float = 3.0) -> dict[str, Any]:
    from tests.e2e.envoynode import envoy_node
    from tests.e2e.test_l7 import backend

    out: dict[str, Any] = {"rate": rate, "duration_s": duration, "fail_percent": fail_percent, "kill_at_s": kill_at,
                           "unready_after_s": unready_after, "cases": {}, "kill": {}}
    killed_case = f"d one backend killed at {kill_at:g} s"
    cases = {"a steady": [(), (), ()], f"b one backend {fail_percent}% 500": [("--fail-percent", str(fail_percent)), (), ()],
             "c one backend +50 ms": [("--delay", "0.05"), (), ()], killed_case: [(), (), ()]}
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
                    body = {"metadata": {"name": name, "namespace": "shop", "labels": labels,
                                         "annotations": ANNOTATIONS[name]},
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
                    if case != killed_case and name in KILL_ONLY:
                        continue
                    if case != killed_case:
                        results = run_in_netns(node.topo.pods[3].name, open_loop, ip, rate, duration,
                                               timeout=duration + 120)
                    else:
                        results, out["kill"][name] = killed(node, standin, backend, name, ip, PORT + 1 + idx,
                                                            rate, duration, kill_at, unready_after)
                        print(f"{case:28} {name:5} {out['kill'][name]}", file=sys.stderr, flush=True)
                    out["cases"][case][name] = summary(results)
                    print(f"{case:28} {name:5} {out['cases'][case][name]}", file=sys.stderr, flush=True)
    return out


def killed(node: Any, standin: StandinSync, backend: Any, name: str, ip: str, victim_port: int, rate: float,
           duration: float, kill_at: float, unready_after: float) -> tuple[list[Result], dict[str, Any]]:
    """Case (d) for one path: a fresh victim in pod 0 (its own slice), killed ``kill_at`` s into the open loop,
    marked not ready ``unready_after`` s after that."""
    victim = backend(node, 0, "--port", str(victim_port))
    node.endpoints(name, {"http": PORT}, [1, 2])
    node.slice(name, {"http": victim_port}, [{"pod": 0}], name=f"{name}-victim")
    pod0 = f"{node.topo.pod_ips[0]}:{victim_port}"
    if name == "kp":
        standin.wait_for(lambda rs: pod0 in rs, timeout=20)
    else:
        wait_until(lambda: node.proxy(name)["services"][0]["keys"][0]["endpoints"] == 3 and node.proxy()["in_sync"],
                   timeout=20, what="the victim in Envoy")
    start = time.monotonic()
    times: dict[str, float] = {}

    def kill() -> None:
        times["killed"] = time.monotonic()
        victim.stop()

    def unready() -> None:
        times["unready"] = time.monotonic()
        node.slice(name, {"http": victim_port}, [{"pod": 0, "ready": False}], name=f"{name}-victim")

    timers = [threading.Timer(kill_at, kill), threading.Timer(kill_at + unready_after, unready)]
    watched: dict[str, list[tuple[float, int, int]]] = {}
    watcher = None
    if name != "kp":
        until = start + duration + 0.5

        def watch() -> None:
            watched["samples"] = run_in_netns(node.envoy.netns.name, watch_envoy, node.envoy.admin_port,
                                              f"shop_{name}_80_ipv4", until, timeout=duration + 30)

        watcher = threading.Thread(target=watch)
        watcher.start()
    for timer in timers:
        timer.start()
    results: list[Result] = run_in_netns(node.topo.pods[3].name, open_loop, ip, rate, duration, timeout=duration + 120)
    for timer in timers:
        timer.join()
    if watcher is not None:
        watcher.join()
    window = kill_window(results, times["killed"], watched.get("samples") if name != "kp" else None)
    window["unready_at_s"] = round(times["unready"] - times["killed"], 3)
    return results, window


def table(out: dict[str, Any]) -> str:
    lines = [f"open loop, {out['rate']:g} req/s for {out['duration_s']:g} s per cell, a new connection per request; "
             "latency from the intended send time (ms)", "",
             "| case | path | requests | errors | p50 | avg | p99 |", "|---|---|---|---|---|---|---|"]
    for case, paths in out["cases"].items():
        for name, r in paths.items():
            lines.append(f"| {case} | {NAMES[name]} | {r['requests']} | {r['errors']} ({r['error_pct']} %) | "
                         f"{r['p50_ms']} | {r['avg_ms']} | {r['p99_ms']} |")
    if out.get("kill"):
        lines += ["", f"(d) the killed backend, until it stops being chosen (kill at {out['kill_at_s']:g} s; its endpoint "
                  f"marked not ready {out['unready_after_s']:g} s after the kill)", "",
                  "| path | failed requests (what the client got) | kill -> last failure | kill -> Envoy ejects it | connections it refused Envoy |",
                  "|---|---|---|---|---|"]

        def secs(value: float | None) -> str:
            return "-" if value is None else f"{1000 * value:.0f} ms"

        for name, k in out["kill"].items():
            if "ejected_after_s" not in k:
                ejected = "no ejection: chosen until the endpoint update"
            else:
                ejected = "none in the run" if k["ejected_after_s"] is None else secs(k["ejected_after_s"])
            refused = str(k["refused_attempts"]) if "refused_attempts" in k else "-"
            seen = ", ".join(f"{n} x {status}" for status, n in k.get("statuses", {}).items())
            failures = f"{k['failures']} ({seen})" if seen else str(k["failures"])
            lines.append(f"| {NAMES[name]} | {failures} | {secs(k['last_failure_s'])} | {ejected} | {refused} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--fail-percent", type=int, default=30, help="case (b): the failing backend's share of 500s")
    p.add_argument("--kill-at", type=float, default=1.0, help="case (d): seconds into the run")
    p.add_argument("--unready-after", type=float, default=3.0,
                   help="case (d): seconds from the kill to the endpoint marked not ready")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not 0 <= a.fail_percent <= 100 or a.kill_at + a.unready_after >= a.duration:
        p.error("--fail-percent is 0-100, and the kill and the endpoint update must fall inside --duration")
    out = run(a.rate, a.duration, a.fail_percent, a.kill_at, a.unready_after)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    print(table(out))


if __name__ == "__main__":
    main()
