"""What one cluster costs Envoy, by what the cluster and the bootstrap carry: start-up time and memory.

Run as root or not: ``.venv/bin/python -m bench.envoy_cluster_cost [--services 5000] [--variants ...]``.
Prints the markdown table of docs/performance.md ("Envoy's cost per cluster").

The control plane translates N dual-stack HTTP Services (2N clusters, 2N endpoint sets, 2 listeners) with
no Envoy attached; each variant is the floor configuration of bench.controlplane_bench (the same resources
inline in a static bootstrap) with one thing changed, loaded by a fresh Envoy (``--concurrency 2``):
process start -> ``/ready`` LIVE with both listeners active, then VmRSS and tcmalloc's allocation 1 s later.
Variants (combine with ``+``): ``shipped`` (as is), ``bare`` (clusters without outlier detection, circuit
breakers, protocol options, lb policy), ``no-outlier``, ``no-cluster-stats`` (no per-cluster stat kept),
``regex`` (the per-cluster stats matched by one regex instead of suffixes), ``eager-stats`` (no deferred
stat creation), ``c1`` (``--concurrency 1``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.controlplane_bench import NODE, Envoy, all_services, all_slices, free_port, static_bootstrap
from controlplane import resources as res
from controlplane.embedded import EmbeddedControlPlane

REGEX = (r"^cluster\.[^.]+\.(upstream_cx_(total|active|connect_fail|connect_timeout|destroy_remote_with_active_rq)"
         r"|upstream_rq_(total|active|[1-5]xx|timeout|retry|retry_success|pending_overflow|time)|membership_(total|healthy)"
         r"|outlier_detection\.ejections_active)$")
DEFAULT_VARIANTS = "shipped,eager-stats,regex,regex+eager-stats,no-outlier,bare,no-cluster-stats,bare+no-cluster-stats,c1"


def snapshot(n: int) -> dict[str, Any]:
    cp = EmbeddedControlPlane(NODE, proxy_port=free_port(), ipv6=True)
    for family, builder in cp.plane.listeners.items():  # loopback only
        builder.listener.address.socket_address.address = "127.0.0.1" if family == 4 else "::1"
    cp.plane.slices.replace(all_slices(n))
    cp.plane.services.replace(all_services(n, "http"))
    cp.plane._publish_static()
    cp.plane.sync(set(cp.plane._views))
    store = cp.plane.store
    return {t: {name: store.get(t, name) for name in store.names(t)} for t in res.TYPES}


def variant(base: dict[str, Any], spec: str) -> tuple[dict[str, Any], int]:
    parts = set(spec.split("+"))
    unknown = parts - {"shipped", "bare", "no-outlier", "no-cluster-stats", "regex", "eager-stats", "c1"}
    if unknown:
        raise SystemExit(f"unknown variant part(s): {', '.join(sorted(unknown))}")
    boot = copy.deepcopy(base)
    for cluster in boot["static_resources"]["clusters"]:
        if "bare" in parts:
            for k in list(cluster):
                if k not in ("name", "type", "load_assignment", "connect_timeout", "alt_stat_name"):
                    cluster.pop(k)
        if "no-outlier" in parts:
            cluster.pop("outlier_detection", None)
    patterns = boot["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
    if "no-cluster-stats" in parts:
        patterns[:] = [p for p in patterns if "suffix" not in p]
    elif "regex" in parts:
        patterns[:] = [{"safe_regex": {"regex": REGEX}}, *(p for p in patterns if "suffix" not in p)]
    if "eager-stats" in parts:
        boot.pop("deferred_stat_options", None)
    return boot, 1 if "c1" in parts else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=5000)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    base = static_bootstrap(snapshot(args.services), 0)
    clusters = len(base["static_resources"]["clusters"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="lpcost-") as tmp:
        for spec in args.variants.split(","):
            boot, concurrency = variant(base, spec)
            port = free_port()
            boot["admin"]["address"]["socket_address"]["port_value"] = port
            envoy = Envoy(Path(tmp), spec.replace("+", "_"), boot, port, concurrency).start()
            try:
                live = envoy.wait_live(2, 300)
                time.sleep(1)
                rows.append((spec, live, envoy.rss(), envoy.memory().get("allocated", 0.0)))
            finally:
                envoy.stop()
            print(f"... {spec}: {rows[-1][1]:.2f} s, {rows[-1][2]:.0f} MiB", file=sys.stderr, flush=True)
    print(f"| {args.services:,} HTTP Services ({clusters:,} clusters), variant | start -> LIVE | VmRSS | tcmalloc allocated |")
    print("|---|---|---|---|")
    for spec, live, rss, allocated in rows:
        print(f"| {spec} | {live:.2f} s | {rss:.0f} MiB | {allocated:.0f} MiB |")
    print(f"\nload average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
