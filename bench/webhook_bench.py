"""Webhook performance: the real ``lightpath-webhook`` over TLS, one worker, driven from other processes.

Run: ``.venv/bin/python -m bench.webhook_bench [--duration 30] [--json out.json] [--pin]``.

Set-up: a CA and serving pair from shared.tls; the sandbox apiserver (in this process) holding an
opted-in namespace; the webhook started as ``python -m webhook --kubeconfig ...`` in a subprocess,
logging one JSON line per admission to a file as in production. With --pin the webhook is pinned to
CPU 0 and the load generators to CPU 1 (taskset); by default the kernel schedules all of them on the
two CPUs (pinning hurts when anything else runs on the machine).

Measures:
(a) latency p50/p99/max at a fixed offered rate of 200 reviews/s, open loop (bench/webhook_load.py:
    keep-alive TLS connections, latency from the intended send time: no coordinated omission);
(b) peak reviews/s with 16 keep-alive connections (wrk -t1 -c16 with a POST Lua script);
(c) in-process decision + patch build time (shared.policy.decide + webhook.patch.plan) and the whole
    pure core (parse_review + admit, incl. the base64 patch and response document), p50/p99 over many
    iterations of a mix of Services (label, unlabel, leave, ineligible).
The review sent in (a) and (b) is a CREATE that gets labelled: the most expensive answer (a patch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.policy import PolicyConfig, decide
from shared.tls import make_ca, make_serving_cert
from webhook.patch import plan
from webhook.review import admit, parse_review

HOSTNAME = "lightpath-webhook.lightpath-system.svc"
NAMESPACE = "bench"


def service(name: str, labels: dict[str, str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shop", **labels},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": json.dumps({"spec": {"ports": ports}})},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.12.34",
            "clusterIPs": ["10.96.12.34"],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "selector": {"app.kubernetes.io/name": name},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ports": ports,
        },
        "status": {"loadBalancer": {}},
    }


def review(svc: dict[str, Any], uid: str = "0d9c1c5e-6a2b-4c49-9d1e-8f5b4b1c2a77") -> dict[str, Any]:
    """Shaped like what kube-apiserver sends for a Service CREATE."""
    kind = {"group": "", "version": "v1", "kind": "Service"}
    resource = {"group": "", "version": "v1", "resource": "services"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid, "kind": kind, "resource": resource, "requestKind": kind, "requestResource": resource,
            "name": svc["metadata"]["name"], "namespace": NAMESPACE, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:argocd:argocd-application-controller",
                         "uid": "4b0f6c9e-2f0c-4a7b-9a37-3d6f1e2c8b10",
                         "groups": ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"]},
            "object": svc, "oldObject": None, "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1", "fieldManager": "argocd-controller"},
        },
    }


TCP_PORTS = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "appProtocol": "http"},
             {"name": "grpc", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]
MIX = [  # (service, namespace labels): label, leave (already ours), unlabel (UDP added), untouched
    (service("web", {}, TCP_PORTS), {c.OPT_LABEL: c.OPT_ENABLED}),
    (service("api", {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}, TCP_PORTS), {c.OPT_LABEL: c.OPT_ENABLED}),
    (service("dns", {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME},
             [*TCP_PORTS, {"name": "dns", "port": 53, "protocol": "UDP"}]), {c.OPT_LABEL: c.OPT_ENABLED}),
    (service("db", {}, TCP_PORTS), {}),
]


def pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))]


def bench_core(iterations: int) -> dict[str, Any]:
    """(c): ns per call of decide+plan, and of the whole pure core, over the MIX."""
    config = PolicyConfig()
    docs = [(review(svc), svc, ns) for svc, ns in MIX]
    out: dict[str, Any] = {"iterations": iterations}
    for name, fn in (
        ("decide_plus_patch", lambda d, s, n: plan(s, decide(s, n, config), n, config)),
        ("parse_admit_response", lambda d, s, n: admit(parse_review(d), n, config)),
    ):
        for d, s, n in docs * 200:  # warm-up
            fn(d, s, n)
        samples: list[int] = []
        clock = time.perf_counter_ns
        for i in range(iterations):
            d, s, n = docs[i % len(docs)]
            t = clock()
            fn(d, s, n)
            samples.append(clock() - t)
        out[name] = {"p50_us": round(pct(samples, 50) / 1000, 2), "p99_us": round(pct(samples, 99) / 1000, 2),
                     "max_us": round(max(samples) / 1000, 1)}
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process: cost per review that does not depend on other load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def taskset(cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu] if cpu is not None and shutil.which("taskset") else []


def parse_wrk(text: str) -> dict[str, Any]:
    def unit_ms(value: str) -> float:
        num, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
        return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    out: dict[str, Any] = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
        if m:
            out[f"p{q}_ms"] = round(unit_ms(m.group(1)), 3)
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text)
    if m:
        out["max_ms"] = round(unit_ms(m.group(1)), 3)
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", text)
    out["socket_errors"] = m.group(1).strip() if m else "none"
    return out


def wait_ready(port: int, cafile: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=str(cafile)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"webhook exited with {proc.returncode}")
            try:
                r = http.get(f"https://127.0.0.1:{port}/readyz", extensions={"sni_hostname": HOSTNAME})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise SystemExit("webhook did not become ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the fixed-rate run (a)")
    parser.add_argument("--peak-duration", type=int, default=20, help="seconds of the wrk run (b)")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--iterations", type=int, default=200_000, help="iterations for (c)")
    parser.add_argument("--pin", action="store_true", help="pin the server to CPU 0 and the load to CPU 1")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    server_cpu, load_cpu = ("0", "1") if args.pin else (None, None)
    py = sys.executable

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
                    "pinned": args.pin},
    }
    results["core"] = bench_core(args.iterations)

    with tempfile.TemporaryDirectory(prefix="lightpath-bench-") as tmp, SandboxApiServer() as api:
        d = Path(tmp)
        ca = make_ca("bench-ca")
        pair = make_serving_cert(ca, [HOSTNAME])
        (d / "ca.pem").write_bytes(ca.cert_pem)
        (d / "tls.crt").write_bytes(pair.cert_pem)
        (d / "tls.key").write_bytes(pair.key_pem)
        body = json.dumps(review(MIX[0][0])).encode()
        (d / "review.json").write_bytes(body)
        results["body_bytes"] = len(body)
        (d / "post.lua").write_text(
            'wrk.method = "POST"\n'
            f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Host"] = "{HOSTNAME}:443"\n'
            f"wrk.body = [==[{body.decode()}]==]\n"
        )
        client.CoreV1Api(api.api_client()).create_namespace(
            {"metadata": {"name": NAMESPACE, "labels": {c.OPT_LABEL: c.OPT_ENABLED}}})
        kubeconfig = api.write_kubeconfig(d / "kubeconfig")
        port = free_port()
        log_file = (d / "webhook.log").open("wb")  # noqa: SIM115 - closed in the finally below
        server = subprocess.Popen(
            [*taskset(server_cpu), py, "-m", "webhook", "--kubeconfig", str(kubeconfig),
             "--tls-cert-file", str(d / "tls.crt"), "--tls-key-file", str(d / "tls.key"),
             "--bind-address", "127.0.0.1", "--port", str(port)],
            stdout=log_file, stderr=log_file,
        )
        try:
            wait_ready(port, d / "ca.pem", server)
            results["loadavg_before"] = os.getloadavg()
            cpu0 = cpu_seconds(server.pid)
            load = subprocess.run(
                [*taskset(load_cpu), py, "-m", "bench.webhook_load", "--port", str(port), "--cafile",
                 str(d / "ca.pem"), "--body", str(d / "review.json"), "--rate", str(args.rate),
                 "--duration", str(args.duration)],
                capture_output=True, check=True,
            )
            results["fixed_rate"] = json.loads(load.stdout)
            results["fixed_rate"]["server_cpu_us_per_review"] = round(
                (cpu_seconds(server.pid) - cpu0) / results["fixed_rate"]["answered"] * 1e6, 1)
            wrk = [*taskset(load_cpu), "wrk", "-t1", "-c16", "--latency", "-s", str(d / "post.lua"),
                   f"https://127.0.0.1:{port}/mutate"]
            subprocess.run([*wrk[:-1], "-d3s", wrk[-1]], capture_output=True, check=True)  # warm-up
            cpu0 = cpu_seconds(server.pid)
            peak = subprocess.run([*wrk[:-1], f"-d{args.peak_duration}s", wrk[-1]], capture_output=True,
                                  text=True, check=True)
            results["peak"] = parse_wrk(peak.stdout)
            results["peak"]["server_cpu_us_per_review"] = round(
                (cpu_seconds(server.pid) - cpu0) / results["peak"]["requests"] * 1e6, 1)
            results["loadavg_after"] = os.getloadavg()
            results["peak"]["command"] = " ".join(wrk[:-1] + [f"-d{args.peak_duration}s", "https://127.0.0.1:PORT/mutate"])
        finally:
            server.terminate()
            server.wait(10)
            log_file.close()
        lines = (d / "webhook.log").read_bytes().splitlines()
        results["server_log"] = {
            "admission_lines": sum(1 for line in lines if b'"msg":"admission"' in line),
            "error_lines": sum(1 for line in lines if b'"level":"ERROR"' in line),
        }

    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def render(r: dict[str, Any]) -> str:
    fr, pk, core = r["fixed_rate"], r["peak"], r["core"]
    lat = fr["latency_ms"]
    return "\n".join([
        f"machine: {r['machine']['cpus']} CPUs ({r['machine']['cpu']}), Python {r['machine']['python']}, "
        f"pinned={r['machine']['pinned']}; review body {r['body_bytes']} bytes",
        "",
        "| measure | figure | goal |",
        "|---|---|---|",
        f"| (a) latency at {fr['offered_rate']:.0f} reviews/s open loop, {fr['measured']} reviews "
        f"| p50 {lat['p50']} ms, p99 {lat['p99']} ms, p99.9 {lat['p99.9']} ms, max {lat['max']} ms | p99 <= 10 ms |",
        f"| (b) peak, 16 keep-alive connections (wrk) | {pk['requests_per_s']:.0f} reviews/s "
        f"(p50 {pk.get('p50_ms')} ms, p99 {pk.get('p99_ms')} ms; non-2xx {pk['non_2xx']}) | >= 1,500 reviews/s |",
        f"| (c) decide + patch build, in process | p50 {core['decide_plus_patch']['p50_us']} us, "
        f"p99 {core['decide_plus_patch']['p99_us']} us | p99 <= 50 us |",
        f"| (c') parse + admit + response document | p50 {core['parse_admit_response']['p50_us']} us, "
        f"p99 {core['parse_admit_response']['p99_us']} us | - |",
        "",
        f"server CPU per review: {fr['server_cpu_us_per_review']} us at 200/s, {pk['server_cpu_us_per_review']} us at peak; "
        f"load average before {r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f}",
        f"(a) statuses {fr['statuses']}, errors {fr['errors']}, achieved {fr['achieved_rate']}/s; "
        f"server log: {r['server_log']['admission_lines']} admission lines, {r['server_log']['error_lines']} errors",
    ])


if __name__ == "__main__":
    main()
