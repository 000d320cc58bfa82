"""The node agent as one process: ``lightpath-redirector run`` (watches, kernel backend AND control plane)
with a real Envoy on its xDS socket, against the sandbox API server (a TEST DOUBLE) holding N Services.

Run as root: ``.venv/bin/python -m bench.agent_bench [--sizes 1000,10000] [--json out.json]``. Prints the
markdown table of docs/performance.md ("The node agent as one process").

Per size, in a fresh node network namespace (nothing on the host's network): N labelled dual-stack Services
(one port, ``appProtocol: http``), each with one EndpointSlice per family holding 2 ready endpoints, are in the
API before the agent starts. Envoy (the product bootstrap, ``--concurrency 2``) is started as soon as the
agent's xDS socket exists, as the two DaemonSets' pods come up on a fresh node. Measured:
- agent start -> its first kernel sync (log line ``full sync done``: the list is in, nothing Envoy has not
  ACKed is redirected yet) and -> every key redirected (``lightpath_redirector_entries`` = 2N on the health
  server: each key passed the gate, so Envoy ACKed its cluster, endpoints, listener and route);
- the agent's VmRSS then and 10 s later, its VmHWM, and Envoy's VmRSS.
The API double runs in this process (its CPU competes with the agent's on this machine, as an apiserver on
another machine would not).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import ENDPOINTSLICES, NAMESPACES, SERVICES
from sandbox.components import RedirectorProcess, netns_get, node_kubeconfig
from sandbox.node.envoy_process import EnvoyProcess
from sandbox.node.netns import NetNS, run_in_netns
from sandbox.node.nsrelay import NetnsRelay
from shared import constants as c

NS = "bench"
# Every Service's two endpoints: addresses on the node namespace's lo, served by one HTTP server there.
BACKENDS = {4: ["10.200.0.1", "10.200.0.2"], 6: ["fd00:200::1", "fd00:200::2"]}
PHASES = {"translated_s": "first translation in the store: Envoy is answered from now on",
          "envoy_stream_s": "Envoy connected"}
SAMPLES = 200  # Services requested twice each (new connection per request) once everything is redirected
NODE = "bench-node"
HEALTH = f"http://{c.REDIRECTOR_HEALTH_ADDRESS}:{c.REDIRECTOR_HEALTH_PORT}"


def populate(api: SandboxApiServer, n: int) -> None:
    """N labelled dual-stack HTTP Services and their two slices, written straight into the double's store."""
    ops = api.operations
    ops.create(NAMESPACES, None, {"metadata": {"name": NS}})
    for i in range(n):
        ops.create(SERVICES, NS, {
            "metadata": {"name": f"svc-{i}", "labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}},
            "spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"}]}})
        for family in (4, 6):
            addresses = BACKENDS[family]
            ops.create(ENDPOINTSLICES, NS, {
                "metadata": {"name": f"svc-{i}-v{family}", "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
                "addressType": f"IPv{family}",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [a], "nodeName": NODE, "conditions": {"ready": True}} for a in addresses]})


def status(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    return fields


def entries(ns: NetNS) -> int:
    """Redirect entries the agent reports programmed (both families, addresses and NodePorts)."""
    try:
        code, text = netns_get(ns, HEALTH + "/metrics", timeout=2)
    except OSError:
        return -1
    if code != 200:
        return -1
    return int(sum(float(m.group(1)) for m in re.finditer(r"^lightpath_redirector_entries\{[^}]*\} (\S+)$", text, re.M)))


def requests(targets: list[str]) -> list[tuple[float, float]]:
    """(first, second) seconds of connect + GET + full answer on a new connection each, per ClusterIP (run
    in the node namespace: a host-network client, through the redirect)."""
    import http.client

    out = []
    for ip in targets:
        pair = []
        for _ in range(2):
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection(ip, 80, timeout=15)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{ip}: HTTP {resp.status}")
            finally:
                conn.close()
            pair.append(time.perf_counter() - t0)
        out.append((pair[0], pair[1]))
    return out


def run(n: int, mode: str, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"services": n, "mode": mode}
    with SandboxApiServer(history_limit=10 * n + 1000, bookmark_interval=1.0) as api:
        populate(api, n)
        gc.collect()
        gc.freeze()  # the double's objects live here: keep the GC off them while the agent lists them
        with NetNS(f"lpa-{os.getpid()}-{n}") as ns, NetnsRelay(ns.name, (api.host, api.port)) as relay:
            ns.run(["ip", "link", "set", "lo", "up"])
            # A default route, as every node has (the kernel routes a ClusterIP before our DNAT rewrites it).
            ns.run(["ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"])
            ns.run(["ip", "link", "set", "uplink0", "up"])
            ns.run(["ip", "link", "set", "uplink1", "up"])
            ns.run(["ip", "route", "add", "default", "dev", "uplink0"])
            ns.run(["ip", "-6", "route", "add", "default", "dev", "uplink0"])
            for family, addresses in BACKENDS.items():
                for a in addresses:
                    ns.run(["ip", f"-{family}", "addr", "add", f"{a}/{32 if family == 4 else 128}", "dev", "lo"])
            backend = ns.popen([sys.executable, "-m", "http.server", "8080", "--bind", "::"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            kubeconfig = node_kubeconfig(workdir / "kubeconfig", relay.url)
            socket = workdir / "run" / "xds.sock"
            socket.parent.mkdir(parents=True, exist_ok=True)
            agent = RedirectorProcess(ns, kubeconfig, workdir / "agent.log",
                                      ["--debug-port", "0", "--envoy-clusters", mode], xds_socket=socket)
            agent.NODE_NAME = NODE
            envoy = EnvoyProcess(ns, workdir / "envoy", xds_socket=socket, node_id=NODE, admin_port=0, concurrency=2,
                                 hot_restart=False)
            t0, wall0 = time.perf_counter(), time.time()
            try:
                # Not RedirectorProcess.start (it waits for readiness): the phases are timed here.
                agent.proc = agent_proc = _spawn(agent)
                deadline = time.monotonic() + 120
                while not socket.exists():
                    _check(agent_proc, workdir, deadline, "xDS socket")
                    time.sleep(0.005)
                out["socket_s"] = time.perf_counter() - t0
                envoy.start(timeout=60)
                out["envoy_admin_s"] = time.perf_counter() - t0
                deadline = time.monotonic() + 300
                log = workdir / "agent.log"
                while b'"full sync done"' not in log.read_bytes():
                    _check(agent_proc, workdir, deadline, "first full sync")
                    time.sleep(0.01)
                out["first_sync_s"] = time.perf_counter() - t0
                while (have := entries(ns)) < 2 * n:
                    _check(agent_proc, workdir, deadline, f"{2 * n} entries (have {have})")
                    time.sleep(0.05)
                out["all_redirected_s"] = time.perf_counter() - t0
                out["agent_at_all"] = status(agent_proc.pid)
                out["envoy_rss_mib"] = envoy.rss_bytes() / 2**20
                time.sleep(10)
                out["agent_after_10s"] = status(agent_proc.pid)
                out["envoy_rss_after_10s_mib"] = envoy.rss_bytes() / 2**20
                rng = random.Random(7)
                targets = [api.store.get(SERVICES, NS, f"svc-{i}")["spec"]["clusterIPs"][j]
                           for i, j in ((rng.randrange(n), rng.randrange(2)) for _ in range(SAMPLES))]
                pairs = run_in_netns(ns.name, requests, targets, timeout=600)
                out["first_request_s"] = [a for a, _ in pairs]
                out["second_request_s"] = [b for _, b in pairs]
                out["envoy_rss_after_requests_mib"] = envoy.rss_bytes() / 2**20
                out["log"] = [json.loads(line) for line in log.read_text().splitlines()
                              if line.startswith("{") and any(m in line for m in PHASES.values())]
                for phase, message in PHASES.items():  # the agent's own log, seconds after its start
                    when = next((e["time"] for e in out["log"] if e.get("msg") == message), None)
                    if when is not None:
                        stamp = datetime.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
                        out[phase] = stamp - wall0
            finally:
                agent.stop()
                envoy.stop()
                backend.kill()
                backend.wait()
    return out


AGENT_ENV: dict[str, str] = {}  # --agent-env


def _spawn(agent: RedirectorProcess) -> Any:
    import subprocess

    from sandbox.components import ROOT, tool

    argv = [*tool("lightpath-redirector"), "run", "--kubeconfig", str(agent.kubeconfig), "--backend", "nftables",
            "--node-name", agent.NODE_NAME, "--xds-socket", str(agent.xds_socket), *agent.extra_args]
    with agent.log_path.open("ab") as log:
        return agent.node.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **AGENT_ENV})


def _check(proc: Any, workdir: Path, deadline: float, what: str) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"agent exited with {proc.returncode}:\n{(workdir / 'agent.log').read_text()[-3000:]}")
    if time.monotonic() > deadline:
        raise TimeoutError(f"agent: no {what} in time:\n{(workdir / 'agent.log').read_text()[-3000:]}")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def ms_pair(key: str) -> Any:
        return lambda r: f"{pct(r[key], 50) * 1e3:.2f} / {pct(r[key], 99) * 1e3:.2f} ms"

    rows = [("agent start -> xDS socket", lambda r: f"{r['socket_s']:.2f} s"),
            ("agent start -> first kernel sync (list in, nothing un-ACKed redirected)", lambda r: f"{r['first_sync_s']:.2f} s"),
            ("agent start -> control plane's first translation in the store (every list in)",
             lambda r: f"{r['translated_s']:.2f} s" if "translated_s" in r else "-"),
            ("agent start -> Envoy's stream answered", lambda r: f"{r['envoy_stream_s']:.2f} s" if "envoy_stream_s" in r else "-"),
            ("**agent start -> every key redirected** (the gate passed for all)", lambda r: f"**{r['all_redirected_s']:.2f} s**"),
            ("**agent VmRSS** then (10 s later)", lambda r: f"**{r['agent_at_all']['VmRSS']:.0f} MiB** "
                                                            f"({r['agent_after_10s']['VmRSS']:.0f} MiB)"),
            ("agent VmHWM", lambda r: f"{r['agent_after_10s']['VmHWM']:.0f} MiB"),
            ("**Envoy VmRSS** then (10 s later)", lambda r: f"**{r['envoy_rss_mib']:.0f} MiB** ({r['envoy_rss_after_10s_mib']:.0f} MiB)"),
            (f"first request to a Service, p50 / p99 ({SAMPLES} Services, new connection)", ms_pair("first_request_s")),
            ("second request, p50 / p99", ms_pair("second_request_s")),
            ("Envoy VmRSS after those requests", lambda r: f"{r['envoy_rss_after_requests_mib']:.0f} MiB")]
    head = "| measure | " + " | ".join(f"{r['services']:,} HTTP, {r['mode']}" for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(fn(r) for r in results) + " |" for label, fn in rows]
    lines.append(f"\nload average {meta['load'][0]:.2f} before, {meta['load_after'][0]:.2f} after; {meta['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--modes", default="eager,on-demand", help="--envoy-clusters values to run")
    parser.add_argument("--agent-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the agent (e.g. MALLOC_ARENA_MAX=64: glibc's default arenas)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for item in args.agent_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--agent-env {item!r}: NAME=VALUE")
        AGENT_ENV[name] = value
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    meta: dict[str, Any] = {"load": os.getloadavg()}
    started = time.perf_counter()
    results = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        for mode in args.modes.split(","):
            print(f"... {n} Services, {mode}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="lpa-") as tmp:
                results.append(run(n, mode, Path(tmp)))
            gc.unfreeze()
            gc.collect()
    meta["load_after"] = os.getloadavg()
    meta["seconds"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(render(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
