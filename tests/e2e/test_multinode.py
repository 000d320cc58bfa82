"""Handover and uninstall on three nodes under load (issues 14 and 15): per node the agent, a real Envoy and
the kube-proxy STAND-IN (v1.33's nftables layout, minSyncPeriod 1 s, drops traffic to ClusterIPs it does not
know); a pod on every node opens a NEW connection every 10 ms to a migrated HTTP and a migrated TCP Service
whose endpoints are spread over the three nodes. The CLI drives every step (`lightpath migrate|rollback|
uninstall` through its real main()), exactly as an operator would."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest

from cli.main import main
from redirector.model import Key
from sandbox.node.client_loop import ClientLoop, Record
from sandbox.node.nftwatch import NftMonitor
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.e2e.envoynode import NS
from tests.e2e.multinode import Cluster, cluster

pytestmark = pytest.mark.root
WEB, DB = "10.96.0.10", "10.96.0.20"
KEYS = {Key(4, WEB, 80), Key(4, DB, 5432)}
CYCLES = int(os.environ.get("LIGHTPATH_TEST_CYCLES", "20"))
TRANSPARENT_CX = f"listener.0.0.0.0_{c.DEFAULT_TRANSPARENT_PORT}.downstream_cx_total"
# Issue 14: no request delayed by the handover. A delay the handover causes is a lost packet: a lost SYN
# fails the request (the client's 1 s socket timeout is Linux's initial SYN RTO), a lost data segment is
# retransmitted after at least 200 ms (TCP_RTO_MIN), so such a request takes over STALL_BOUND. A request over
# DELAY_BOUND but under STALL_BOUND is the shared machine's scheduler (the CI run of stop 19 saw two of
# 37,429 at 102 and 130 ms with no failure), allowed for at most one request in NOISE_SHARE.
DELAY_BOUND, STALL_BOUND, NOISE_SHARE = 0.100, 0.190, 1000


def lightpath(kubeconfig: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--kubeconfig", str(kubeconfig), "--color", "never", *argv])
    return code, out.getvalue()


def _workload(k: Cluster) -> None:
    for node in k.nodes:
        node.serve(0, "http", 4, port=8080)
        node.serve(0, "tcp", 4, port=5433)
    k.service("web", [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}], WEB)
    k.service("db", [{"name": "db", "port": 5432, "targetPort": 5433}], DB)
    k.slice("web", {"http": 8080}, [(i, 0) for i in range(len(k.nodes))])
    k.slice("db", {"db": 5433}, [(i, 0) for i in range(len(k.nodes))])
    for standin in k.standins:
        standin.wait_for(lambda rs: f"{WEB} . tcp . 80 : goto service-" in rs and f"{DB} . tcp . 5432 : goto" in rs,
                         timeout=20)


def _loops(k: Cluster, tmp_path: Path) -> list[ClientLoop]:
    loops = []
    for i, node in enumerate(k.nodes):
        pod = node.topo.pods[1]
        loops += [ClientLoop(pod, WEB, 80, stop_file=tmp_path / f"web{i}.stop", duration=900, interval=0.01,
                             timeout=1.0),
                  ClientLoop(pod, DB, 5432, stop_file=tmp_path / f"db{i}.stop", duration=900, interval=0.01,
                             timeout=1.0, tcp=True)]
    for loop in loops:
        loop.wait_for(20, timeout=30)
    return loops


def _advance(loops: list[ClientLoop], n: int = 10) -> None:
    """Every loop finished ``n`` more requests (the state just reached has been exercised)."""
    for loop in loops:
        loop.wait_for(n, timeout=20)


def _summary(records: list[list[Record]]) -> str:
    times = sorted(r.t1 - r.t0 for recs in records for r in recs if r.ok)
    p99 = times[int(len(times) * 0.99)]
    return (f"{sum(len(r) for r in records)} requests, {sum(not x.ok for r in records for x in r)} failed; "
            f"duration p50 {statistics.median(times) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {times[-1] * 1000:.1f} ms")


def test_twenty_migrate_rollback_cycles_on_three_nodes_lose_and_stall_no_request(tmp_path: Path) -> None:
    with cluster(tmp_path) as k:
        _workload(k)
        kubeconfig = tmp_path / "kubeconfig"
        loops = _loops(k, tmp_path)
        took: dict[str, list[float]] = {"migrate": [], "rollback": []}
        try:
            for _ in range(CYCLES):
                started = time.monotonic()
                code, said = lightpath(kubeconfig, "migrate", f"{NS}/web", f"{NS}/db", "--handover-timeout", "20")
                assert code == 0, said
                for node in k.nodes:  # prepared on every node before the label: the redirect is in already
                    assert node.kernel_keys() >= KEYS, (node.name, said)
                for standin in k.standins:
                    standin.wait_for(lambda rs: WEB not in rs and DB not in rs, timeout=10)
                took["migrate"].append(time.monotonic() - started)
                _advance(loops)
                assert all(r.via == "envoy" for r in loops[0].records[-5:]), "HTTP not on Envoy after migrate"
                started = time.monotonic()
                code, said = lightpath(kubeconfig, "rollback", f"{NS}/web", f"{NS}/db")
                assert code == 0, said
                for standin in k.standins:
                    standin.wait_for(lambda rs: f"{WEB} . tcp . 80 : goto service-" in rs, timeout=10)
                for node in k.nodes:
                    wait_until(lambda n=node: not KEYS & n.kernel_keys(), timeout=15, what=f"{node.name} released")
                took["rollback"].append(time.monotonic() - started)
                _advance(loops)
                assert all(r.via == "direct" for r in loops[0].records[-5:]), "HTTP not on kube-proxy after rollback"
        finally:
            records = [loop.stop() for loop in loops]
        failed = [r for recs in records for r in recs if not r.ok]
        slow = sorted((r.t1 - r.t0 for recs in records for r in recs if r.ok and r.t1 - r.t0 > DELAY_BOUND),
                      reverse=True)
        print(f"\n{CYCLES} cycles on {len(k.nodes)} nodes: {_summary(records)}; migrate p50 "
              f"{statistics.median(took['migrate']):.2f} s, rollback p50 {statistics.median(took['rollback']):.2f} s")
        assert not failed, failed[:5]
        total = sum(len(recs) for recs in records)
        assert not [s for s in slow if s > STALL_BOUND], [round(s * 1000) for s in slow[:10]]
        assert len(slow) <= total // NOISE_SHARE, [round(s * 1000) for s in slow[:10]]


def test_uninstall_on_three_nodes_hands_back_and_leaves_no_rule_on_any_node(tmp_path: Path) -> None:
    from kubernetes import client

    from sandbox.node.netns import nft

    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "lightpath-redirector"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
              "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "r", "image": "i"}]}}}}
    with cluster(tmp_path, agent_args=("--daemonset", "lightpath-redirector")) as k:
        apps = client.AppsV1Api(k.api.api_client())
        apps.create_namespaced_daemon_set(c.DEFAULT_AGENT_NAMESPACE, ds)
        _workload(k)
        kubeconfig = tmp_path / "kubeconfig"
        loops = _loops(k, tmp_path)
        monitors = [NftMonitor(node.topo.node) for node in k.nodes]  # diagnosis, should a request fail
        try:
            code, said = lightpath(kubeconfig, "migrate", f"{NS}/web", f"{NS}/db")
            assert code == 0, said
            for node in k.nodes:
                assert node.kernel_keys() >= KEYS
            _advance(loops)
            marks = {"uninstall": time.monotonic()}
            code, said = lightpath(kubeconfig, "uninstall", "--timeout", "60")
            marks["uninstalled"] = time.monotonic()
            assert code == 0, said
            assert not client.AdmissionregistrationV1Api(k.api.api_client()).list_mutating_webhook_configuration().items
            for node, standin in zip(k.nodes, k.standins, strict=True):
                standin.wait_for(lambda rs: f"{WEB} . tcp . 80 : goto service-" in rs and f"{DB} . tcp . 5432" in rs,
                                 timeout=5)
                assert not KEYS & node.kernel_keys(), node.name  # every agent let go, after kube-proxy served
            _advance(loops)
            marks["delete"] = time.monotonic()
            apps.delete_namespaced_daemon_set("lightpath-redirector", c.DEFAULT_AGENT_NAMESPACE)
            for node in k.nodes:
                marks[node.name] = time.monotonic()
                wait_until(lambda n=node: n.agent.logged("DaemonSet is being deleted"), timeout=10, what="deletion")
                assert node.agent.signal(signal.SIGTERM) == 0  # the kubelet stops each agent
                assert "lightpath" not in nft(node.topo.node.name, "list tables"), node.name
            _advance(loops)
        finally:
            records = [loop.stop() for loop in loops]
            for monitor in monitors:
                monitor.stop()
        print(f"\nuninstall on {len(k.nodes)} nodes: {_summary(records)}")
        failed = [(i, r) for i, recs in enumerate(records) for r in recs if not r.ok]
        if failed:
            start = marks["uninstall"] - 1
            for i, m in enumerate(monitors):
                print(f"node-{i}:", "; ".join(f"{ip}:{port} {m.coverage(ip, port, start).describe()}"
                                            for ip, port in ((WEB, 80), (DB, 5432))))
                for t, lines in m.generations:
                    if t >= start:
                        print(f"  {t:.3f}", " | ".join(x for x in lines if WEB in x or DB in x or "table" in x)[:400])
        assert not failed, (marks, [(i, round(r.t0, 3), round(r.t1, 3), r.error) for i, r in failed])
        assert all(r.via == "direct" for r in records[0][-5:])


def test_a_migration_one_node_cannot_serve_aborts_cleanly_and_a_killed_agent_does_not_stall_one(
        tmp_path: Path) -> None:
    """Issue 14's failure cases on three nodes under the client loops: Envoy on node-1 refuses one Service
    (a real NACK, through the test hook) -> its migration aborts, naming node-1, and kube-proxy keeps it
    everywhere; an agent SIGKILLed in the middle of a migration and restarted (as the kubelet does) -> the
    migration completes. 0 failed requests throughout."""
    from redirector.node import TEST_REFUSE_ENV

    with cluster(tmp_path, agent_env={1: {TEST_REFUSE_ENV: f"{NS}/db"}}) as k:
        _workload(k)
        kubeconfig = tmp_path / "kubeconfig"
        loops = _loops(k, tmp_path)
        try:
            code, said = lightpath(kubeconfig, "migrate", f"{NS}/db", "--handover-timeout", "4")
            assert code != 0 and "node-1" in said and "not prepared" in said, said
            svc = k.core.read_namespaced_service("db", NS)
            assert c.HANDOVER_ANNOTATION not in (svc.metadata.annotations or {})
            assert c.SERVICE_PROXY_NAME_LABEL not in (svc.metadata.labels or {})
            for node, standin in zip(k.nodes, k.standins, strict=True):
                assert f"{DB} . tcp . 5432 : goto" in (standin.applied or ""), node.name  # kube-proxy keeps it
            wait_until(lambda: all(Key(4, DB, 5432) not in n.kernel_keys() for n in k.nodes), timeout=15,
                       what="the prepared nodes let go of the aborted Service")
            _advance(loops)
            # An agent killed while a migration waits for it: restarted, it prepares the Service; done. Frozen
            # first (SIGSTOP), so it is certainly killed before it could prepare.
            victim = k.nodes[2]
            assert victim.agent.proc is not None
            os.kill(victim.agent.proc.pid, signal.SIGSTOP)
            result: list[tuple[int, str]] = []
            migrate = threading.Thread(target=lambda: result.append(
                lightpath(kubeconfig, "migrate", f"{NS}/web", "--handover-timeout", "30")))
            migrate.start()
            wait_until(lambda: c.HANDOVER_ANNOTATION in (
                k.core.read_namespaced_service("web", NS).metadata.annotations or {}), timeout=10, what="marked")
            assert victim.agent.signal(signal.SIGKILL) == -signal.SIGKILL
            assert not result, "the migration went on without node-2's agent"
            victim.agent.start()
            migrate.join(60)
            assert result and result[0][0] == 0, result
            for node in k.nodes:
                assert Key(4, WEB, 80) in node.kernel_keys(), node.name
            _advance(loops)
            assert all(r.via == "envoy" for r in loops[2 * 2].records[-5:])  # node-2's HTTP loop on its Envoy
        finally:
            records = [loop.stop() for loop in loops]
        print(f"\nabort + agent kill on {len(k.nodes)} nodes: {_summary(records)}")
        assert not [r for recs in records for r in recs if not r.ok]


def test_a_namespace_opt_in_is_finished_by_the_webhooks_handover_controller(tmp_path: Path) -> None:
    """No CLI drives it: the Namespace is opted in and a Service is then written (an UPDATE). The webhook
    marks it instead of labelling it; every node's agent prepares it; the webhook's leader-elected handover
    controller sets the label. 0 failed requests from every node while it moves."""
    with cluster(tmp_path) as k:
        _workload(k)
        loops = _loops(k, tmp_path)
        try:
            k.core.patch_namespace(NS, {"metadata": {"labels": {c.OPT_LABEL: c.OPT_ENABLED}}})
            touched = k.core.patch_namespaced_service("web", NS, {"metadata": {"annotations": {"touched": "1"}}})
            assert (touched.metadata.annotations or {}).get(c.HANDOVER_ANNOTATION) == c.HANDOVER_MIGRATE
            assert c.SERVICE_PROXY_NAME_LABEL not in (touched.metadata.labels or {})  # marked, not labelled
            wait_until(lambda: (k.core.read_namespaced_service("web", NS).metadata.labels or {}).get(
                c.SERVICE_PROXY_NAME_LABEL) == c.DEFAULT_PROXY_NAME, timeout=30, what="labelled by the controller")
            assert c.HANDOVER_ANNOTATION not in (k.core.read_namespaced_service("web", NS).metadata.annotations or {})
            for node in k.nodes:
                assert Key(4, WEB, 80) in node.kernel_keys(), node.name
            told = k.core.list_namespaced_event(NS, field_selector="involvedObject.name=web").items
            reasons = {e.reason for e in told if e.source and e.source.component == "lightpath-handover-controller"}
            assert {c.EVENT_HANDOVER_STARTED, c.EVENT_MIGRATED} <= reasons, reasons  # kubectl describe shows them
            for standin in k.standins:
                standin.wait_for(lambda rs: WEB not in rs, timeout=10)
            _advance(loops)
            assert all(r.via == "envoy" for loop in loops[::2] for r in loop.records[-5:])
        finally:
            records = [loop.stop() for loop in loops]
        print(f"\ncontroller-driven handover on {len(k.nodes)} nodes: {_summary(records)}")
        assert not [r for recs in records for r in recs if not r.ok]


def test_a_client_on_another_node_is_seen_by_an_external_traffic_policy_local_backend(tmp_path: Path) -> None:
    """docs/conformance.md row 6 from outside the node: a pod on node 1 dials node 0's NodePort of an ETP
    Local Service migrated with --preserve-source-ip on; node 0's Envoy connects to its local endpoint from
    that pod's address, and the backend's replies, addressed to node 1's pod, are routed back to Envoy."""
    from sandbox.node.traffic import tcp_request

    with cluster(tmp_path, nodes=2, agent_args=["--preserve-source-ip", "on"]) as k:
        here, there = k.nodes
        here.serve(0, "tcp", 4, port=8081)
        k.service("edge", [{"name": "tcp", "port": 81, "targetPort": 8081, "nodePort": 30081}], "10.96.0.90",
                  type="NodePort", externalTrafficPolicy="Local")
        k.slice("edge", {"tcp": 8081}, [(0, 0)])
        code, said = lightpath(tmp_path / "kubeconfig", "migrate", f"{NS}/edge", "--handover-timeout", "20")
        assert code == 0, said
        client = there.topo.pod_ips[1]

        def peer() -> str:
            return str(tcp_request(there.topo.pods[1], here.topo.node_ip, 30081)["peer"][0])

        wait_until(lambda: peer() == client, timeout=20, what="the backend sees the other node's pod")
        assert Key(4, None, 30081) in here.kernel_keys()  # migrated: the kube-proxy stand-in no longer serves it
        before = here.envoy_counter(TRANSPARENT_CX)
        assert all(peer() == client for _ in range(20))
        assert here.envoy_counter(TRANSPARENT_CX) - before == 20  # every one through Envoy's transparent listener
