"""Issue 15 point 2: Envoy restarts and upgrades on a node, done exactly as deploy/proxy does them.

The Envoys run with the DaemonSet's flags (admin on a kernel-picked port found through
--admin-address-path, --drain-time-s, --drain-strategy, no hot restart, two workers), and the probes and the
preStop hook are the manifest's own bash, run in the node's network namespace. Clients in a pod open a NEW
connection every 5 ms to a migrated HTTP Service and a migrated TCP Service; a request fails when it is
refused, reset, unanswered or slower than 1 s (the loop's timeout).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from redirector.model import Key
from sandbox.node.client_loop import ClientLoop, Record
from sandbox.node.envoy_process import EnvoyProcess
from sandbox.node.traffic import wait_until
from tests.e2e.envoynode import CLUSTER_IPS, EnvoyNode, envoy_node

pytestmark = pytest.mark.root
DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "proxy" / "daemonset.yaml"
DB_IP = "10.96.0.20"


def proxy_container() -> dict[str, Any]:
    ds = yaml.safe_load(DAEMONSET.read_text())
    container: dict[str, Any] = ds["spec"]["template"]["spec"]["containers"][0]
    return container


def flag(ctr: dict[str, Any], name: str) -> str:
    args = ctr["args"]
    return str(args[args.index(name) + 1])


def hooks(ctr: dict[str, Any]) -> dict[str, list[str]]:
    return {"ready": ctr["readinessProbe"]["exec"]["command"], "live": ctr["livenessProbe"]["exec"]["command"],
            "preStop": ctr["lifecycle"]["preStop"]["exec"]["command"]}


def daemonset_envoy(node: EnvoyNode, name: str, ctr: dict[str, Any]) -> EnvoyProcess:
    """An Envoy as the DaemonSet starts it (the sandbox's bootstrap with admin port 0, like the ConfigMap's)."""
    return node.another_envoy(name, admin_port=0, concurrency=int(flag(ctr, "--concurrency")),
                              drain_time_s=int(flag(ctr, "--drain-time-s")),
                              drain_strategy=flag(ctr, "--drain-strategy"), hot_restart=False)


def run_hook(node: EnvoyNode, ctr: dict[str, Any], envoy: EnvoyProcess, which: str,
             timeout: float) -> subprocess.CompletedProcess[str]:
    """The manifest's command in the node's netns, pointed at this Envoy's admin address file."""
    path = flag(ctr, "--admin-address-path")
    argv = [arg.replace(path, str(envoy.admin_address_path)) for arg in hooks(ctr)[which]]
    return subprocess.run(["ip", "netns", "exec", node.topo.node.name, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def listening_pids(node: EnvoyNode, port: int) -> set[int]:
    out = subprocess.run(["ip", "netns", "exec", node.topo.node.name, "ss", "-Hltnp", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    return {int(part.split(",")[0]) for part in out.split("pid=")[1:]}


def migrated_services(node: EnvoyNode) -> None:
    web = node.serve(1, "http", 4)
    node.serve(2, "tcp", 4, port=5433)
    node.service("web", [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}])
    node.endpoints("web", {"http": web.port}, [1])
    node.service("db", [{"name": "db", "port": 5432, "targetPort": 5433}], ips=(DB_IP,))
    node.endpoints("db", {"db": 5433}, [2])
    want = {Key(4, CLUSTER_IPS[0], 80), Key(4, DB_IP, 5432)}
    wait_until(lambda: want <= node.kernel_keys(), timeout=30, what="both redirects, after Envoy's ACK")


def client_loops(node: EnvoyNode, tmp: Path) -> tuple[ClientLoop, ClientLoop]:
    client = node.topo.pods[0]
    http = ClientLoop(client, CLUSTER_IPS[0], 80, stop_file=tmp / "stop-http", duration=120, count=100_000)
    tcp = ClientLoop(client, DB_IP, 5432, stop_file=tmp / "stop-tcp", duration=120, count=100_000, tcp=True)
    http.wait_for(50)
    tcp.wait_for(50)
    return http, tcp


def in_sync_streams(node: EnvoyNode, n: int) -> bool:
    proxy = node.proxy()
    streams = proxy["streams"]
    return bool(proxy["in_sync"]) and len(streams) == n and all(s["in_sync"] for s in streams)


def hook_ok(node: EnvoyNode, ctr: dict[str, Any], envoy: EnvoyProcess, which: str) -> bool:
    return run_hook(node, ctr, envoy, which, timeout=10).returncode == 0


def figures(name: str, records: list[Record]) -> str:
    failed = [r for r in records if not r.ok]
    slowest = max(r.t1 - r.t0 for r in records)
    errors = sorted({r.error or "" for r in failed})
    return f"{name}: {len(records)} connections, {len(failed)} failed, slowest {slowest * 1000:.0f} ms {errors[:3]}"


def test_envoy_rollout_refuses_no_connection(tmp_path: Path) -> None:
    """maxSurge: the new Envoy binds the same port beside the old one (SO_REUSEPORT), is ready once it has the
    agent's listeners; the old one's preStop drains it, then SIGTERM. No connection fails."""
    ctr = proxy_container()
    with envoy_node(tmp_path, start_envoy=False) as node:
        old = daemonset_envoy(node, "envoy-old", ctr).start()
        migrated_services(node)
        # Set by the agent (redirector/sysctls.py): the old Envoy's queued connections move to the new one.
        assert node.topo.node.run(["sysctl", "-n", "net.ipv4.tcp_migrate_req"]).stdout.strip() == "1"
        wait_until(lambda: hook_ok(node, ctr, old, "ready"), timeout=20, what="old Envoy ready (manifest probe)")
        http, tcp = client_loops(node, tmp_path)

        new = daemonset_envoy(node, "envoy-new", ctr).start()
        wait_until(lambda: hook_ok(node, ctr, new, "ready") and in_sync_streams(node, 2), timeout=30,
                   what="the new Envoy ready and in sync in /debug/proxy, beside the old one")
        assert new.admin_port != old.admin_port
        assert old.proc is not None and new.proc is not None
        assert listening_pids(node, 1666) == {old.proc.pid, new.proc.pid}  # both bound: SO_REUSEPORT
        http.wait_for(100)
        tcp.wait_for(100)

        started = time.monotonic()
        pre_stop = run_hook(node, ctr, old, "preStop", timeout=int(flag(ctr, "--drain-time-s")) + 10)
        drained = time.monotonic()
        assert pre_stop.returncode == 0, pre_stop.stderr
        assert listening_pids(node, 1666) == {new.proc.pid}  # the old sockets closed, the new ones kept
        old.stop()  # the kubelet's SIGTERM once preStop returned
        http.wait_for(200)
        tcp.wait_for(200)
        assert hook_ok(node, ctr, new, "ready") and hook_ok(node, ctr, new, "live")
        records = {"http": http.stop(), "tcp": tcp.stop()}
        print(f"\npreStop took {(drained - started) * 1000:.0f} ms")
        for name, rows in records.items():
            print(figures(name, rows))
            assert [r for r in rows if not r.ok] == [], figures(name, rows)
            assert any(r.t0 > drained for r in rows)
        assert new.counter("cluster.shop_db_5432_ipv4.upstream_cx_total") > 0
        served = new.counter("cluster.shop_web_80_ipv4.upstream_rq_total")
        assert served > 0
        # The agent finds the admin of an Envoy started as the DaemonSet does (port picked by the kernel,
        # --envoy-admin auto): its per-Service figures are Envoy's own counters, not "unavailable".
        def reported() -> object:
            traffic = node.proxy("web")["services"][0]["keys"][0]["traffic"]
            return traffic.get("upstream_rq_total") if isinstance(traffic, dict) else traffic

        wait_until(lambda: reported() == served, timeout=10, what="/debug/proxy reads the new Envoy's counters")


def test_envoy_crash_fails_connections_only_until_the_restarted_one_acked(tmp_path: Path) -> None:
    """SIGKILL, then the kubelet restarts the container: connections fail while no Envoy listens (the
    kernel fallback is another part of issue 15), and every one started after the new Envoy ACKed works."""
    ctr = proxy_container()
    with envoy_node(tmp_path, start_envoy=False) as node:
        envoy = daemonset_envoy(node, "envoy", ctr).start()
        migrated_services(node)
        http, tcp = client_loops(node, tmp_path)
        killed = time.monotonic()
        envoy.kill()
        envoy.start()
        wait_until(lambda: in_sync_streams(node, 1), timeout=30, what="the restarted Envoy in sync")
        acked = time.monotonic()
        http.wait_for(200)
        tcp.wait_for(200)
        records = {"http": http.stop(), "tcp": tcp.stop()}
        print(f"\nkill -> restarted Envoy ACKed: {(acked - killed) * 1000:.0f} ms")
        for name, rows in records.items():
            failed = [r for r in rows if not r.ok]
            print(figures(name, rows), f"failed between {min((r.t0 - killed for r in failed), default=0) * 1000:.0f} and "
                  f"{max((r.t0 - killed for r in failed), default=0) * 1000:.0f} ms after the kill")
            assert all(killed - 1 <= r.t0 <= acked for r in failed), figures(name, rows)
            assert [r for r in rows if r.t0 > acked and r.ok]  # traffic came back
