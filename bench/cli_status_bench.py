"""Benchmark: `lightpath status -A` over 10,000 Services in the sandbox API server (a test double).

What it measures (figures go to docs/performance.md, CLI section):
- the in-process time of `status -A` (table and `-o json`) through cli.main.main, median of N runs,
  and how many API requests it made (one paginated Service list + one Namespace list, never a GET per Service);
- the wall-clock time of the installed `lightpath status -A` console script (Python start-up included).

Run:  .venv/bin/python -m bench.cli_status_bench [--services 10000] [--namespaces 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client

from cli import kube, render
from cli.main import main
from cli.rows import build_rows, namespace_labels, summarize
from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.policy import PolicyConfig


def service(i: int, namespaces: int) -> dict[str, Any]:
    """A realistic mix: plain TCP, HTTP appProtocol, UDP, some migrated, some opted in but PENDING."""
    kind = i % 20
    ports: list[dict[str, Any]] = [{"name": "http", "port": 80, "protocol": "TCP"}]
    labels: dict[str, str] = {}
    if kind < 4:
        ports[0]["appProtocol"] = "http"
    elif kind < 6:
        ports = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    elif kind == 6:
        labels = {c.OPT_LABEL: c.OPT_ENABLED, c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
    elif kind == 7:
        labels = {c.OPT_LABEL: c.OPT_ENABLED}  # PENDING: no webhook in this benchmark
    return {
        "metadata": {"name": f"svc-{i:05d}", "namespace": f"ns-{i % namespaces:03d}", "labels": labels},
        "spec": {"type": "ClusterIP", "ports": ports},
    }


def load(api: SandboxApiServer, services: int, namespaces: int, threads: int = 8) -> float:
    """Create the Namespaces and Services through the official client from a thread pool; returns seconds."""
    core = client.CoreV1Api(api.api_client())
    for n in range(namespaces):
        core.create_namespace({"metadata": {"name": f"ns-{n:03d}"}})
    started = time.perf_counter()

    def create(i: int) -> None:
        body = service(i, namespaces)
        core.create_namespaced_service(body["metadata"]["namespace"], body, _preload_content=False)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, range(services), chunksize=64))
    return time.perf_counter() - started


class Counted(kube.Cluster):
    """Counts API requests, to show the shape: pages of one list, not one request per Service."""

    calls: list[str] = []

    def _call(self, what, fn):  # type: ignore[no-untyped-def]
        Counted.calls.append(what)
        return super()._call(what, fn)


def in_process(kubeconfig: Path, argv: list[str], runs: int) -> tuple[list[float], str]:
    times, out = [], ""
    for _ in range(runs):
        buf = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            code = main(["--kubeconfig", str(kubeconfig), *argv])
        times.append(time.perf_counter() - started)
        if code != 0:
            raise SystemExit(f"lightpath {' '.join(argv)} exited {code}")
        out = buf.getvalue()
    return times, out


def console_script(kubeconfig: Path, runs: int) -> list[float]:
    exe = Path(sys.executable).parent / "lightpath"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [*argv, "--kubeconfig", str(kubeconfig), "status", "-A"], check=True, stdout=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - started)
    return times


def breakdown(kubeconfig: Path, runs: int) -> tuple[list[float], list[float]]:
    """Where the time goes: the two paginated lists vs. policy + table rendering (pure, no I/O)."""
    cluster, _ = kube.connect(str(kubeconfig), None)
    listing, pure = [], []
    for _ in range(runs):
        started = time.perf_counter()
        namespaces = cluster.list_namespaces()
        services = cluster.list_services(None)
        listed = time.perf_counter()
        rows = build_rows(services, namespace_labels(namespaces), PolicyConfig())
        render.status_table(rows, summarize(rows), colour=False)
        listing.append(listed - started)
        pure.append(time.perf_counter() - listed)
    return listing, pure


def fmt(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, n={len(times)})"


def run(services: int, namespaces: int, runs: int) -> dict[str, Any]:
    with SandboxApiServer(history_limit=100) as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        load_s = load(api, services, namespaces)
        original = kube.Cluster
        kube.Cluster = Counted  # type: ignore[misc]
        try:
            Counted.calls.clear()
            table, out = in_process(kubeconfig, ["status", "-A"], 1)
            requests = list(Counted.calls)
        finally:
            kube.Cluster = original  # type: ignore[misc]
        table += in_process(kubeconfig, ["status", "-A"], runs - 1)[0]
        as_json, json_out = in_process(kubeconfig, ["status", "-A", "-o", "json"], runs)
        summary = json.loads(json_out)["summary"]
        script = console_script(kubeconfig, runs)
        listing, pure = breakdown(kubeconfig, runs)
    return {
        "services": services,
        "namespaces": namespaces,
        "load_seconds": load_s,
        "requests": {what: requests.count(what) for what in dict.fromkeys(requests)},
        "summary": summary,
        "table_lines": out.count("\n"),
        "status_table": table,
        "status_json": as_json,
        "console_script": script,
        "listing": listing,
        "pure": pure,
    }


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(args.services, args.namespaces, max(args.runs, 2))
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(
        f"sandbox API server (test double): {r['services']} Services in {r['namespaces']} namespaces, "
        f"created in {r['load_seconds']:.1f} s ({r['services'] / r['load_seconds']:.0f}/s, 8 client threads)"
    )
    print(f"API requests per `status -A`: {r['requests']}")
    print(f"summary: {r['summary']}")
    print(f"status -A (table, in-process):      {fmt(r['status_table'])}")
    print(f"  of which: the 2 paginated lists   {fmt(r['listing'])}")
    print(f"  of which: policy + table (pure)   {fmt(r['pure'])}")
    print(f"status -A -o json (in-process):     {fmt(r['status_json'])}")
    print(f"lightpath status -A (console script, incl. start-up): {fmt(r['console_script'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
