"""Handover under load on a node with the agent, a real Envoy and the kube-proxy STAND-IN (kube-proxy v1.33's
nftables layout, minSyncPeriod 1 s, drops traffic to ClusterIPs it does not know): rollbacks keep the
redirect until kube-proxy's rule is visible (make-before-break), so a client opening a new connection every
5 ms sees no failure and no stall."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from redirector.model import Key
from redirector.node import TEST_REFUSE_ENV
from sandbox.kubeproxy import StandinSync
from sandbox.node.client_loop import ClientLoop
from sandbox.node.traffic import wait_until
from shared import constants as c
from tests.e2e.envoynode import CLUSTER_IPS, NS, envoy_node

pytestmark = pytest.mark.root
IP = CLUSTER_IPS[0]
LABEL = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}}}
UNLABEL = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}}}


def test_rollback_and_migration_under_load_lose_no_request(tmp_path: Path) -> None:
    run_cycles(tmp_path, agent_args=())


def test_the_same_against_kube_proxy_in_iptables_mode(tmp_path: Path) -> None:
    """The stand-in in kube-proxy's iptables layout (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*): the agent reads
    its rules from iptables-save and hands back only once the Service's rule is there."""
    run_cycles(tmp_path, agent_args=(), mode="iptables")


def run_cycles(tmp_path: Path, agent_args: tuple[str, ...], mode: str = "nftables") -> None:
    def serving(rs: str) -> bool:
        return (f"-d {IP}/32 -p tcp" in rs) if mode == "iptables" else (f"{IP} . tcp . 80 : goto service-" in rs)

    with envoy_node(tmp_path, agent_args=agent_args) as node, StandinSync(
            node.api.api_client(), node.topo.node.name, watch_timeout=5, min_sync_period=1.0, mode=mode) as standin:
        node.serve(0, "http", 4, port=8080)
        node.service("web", [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
        node.endpoints("web", {"http": 8080}, [0])
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="migrated")
        loop = ClientLoop(node.topo.pods[1], IP, 80, stop_file=tmp_path / "loop.stop", duration=60, timeout=1.0)
        try:
            loop.wait_for(20)
            results = []
            for cycle in range(2):
                start = len(loop.records)
                node.core.patch_namespaced_service("web", NS, UNLABEL)  # rollback: kube-proxy takes over
                standin.wait_for(serving, timeout=10)
                wait_until(lambda: Key(4, IP, 80) not in node.kernel_keys(), timeout=15, what="redirect released")
                loop.wait_for(40)
                assert any(r.ok and r.via == "direct" for r in loop.records[start:]), "never served by kube-proxy"
                mid = len(loop.records)
                node.core.patch_namespaced_service("web", NS, LABEL)  # migrate again
                wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=15, what="redirect back")
                standin.wait_for(lambda rs: IP not in rs, timeout=10)
                loop.wait_for(40)
                assert any(r.ok and r.via == "envoy" for r in loop.records[mid:]), "never back on Envoy"
                results.append((cycle, loop.records[start:]))
        finally:
            records = loop.stop()
        failed = [r for r in records if not r.ok]
        slow = [r for r in records if r.ok and r.t1 - r.t0 > 0.5]
        assert not failed, failed[:5]
        assert not slow, [round(r.t1 - r.t0, 3) for r in slow[:5]]
        metrics = node.debug("/metrics")[1]
        count = next(line for line in metrics.splitlines()
                     if line.startswith('lightpath_redirector_handback_hold_seconds_count{released_by="kube-proxy"}'))
        assert float(count.split()[-1]) >= 2  # each rollback waited for kube-proxy's rule, not for a timer


def test_migration_is_prepared_on_the_node_before_the_label_and_aborts_cleanly(tmp_path: Path) -> None:
    """The handover protocol: mark -> the agent installs the redirect once Envoy serves it and says so in its
    Lease -> only then the label. A Service Envoy refuses is never prepared: the migration aborts, the mark
    goes, kube-proxy keeps serving it."""
    from cli.handover import prepare
    from cli.kube import Cluster
    from cli.rows import Ref

    with envoy_node(tmp_path, agent_env={TEST_REFUSE_ENV: f"{NS}/bad"}) as node, \
            StandinSync(node.api.api_client(), node.topo.node.name, watch_timeout=5, min_sync_period=1.0) as standin:
        node.serve(0, "http", 4, port=8080)
        http = [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]
        node.service("web", http, labelled=False)
        node.service("bad", http, ips=("10.96.0.40",), labelled=False)
        node.endpoints("web", {"http": 8080}, [0])
        node.endpoints("bad", {"http": 8080}, [0])
        standin.wait_for(lambda rs: f"{IP} . tcp . 80 : goto service-" in rs and "10.96.0.40 . tcp . 80" in rs)
        cluster = Cluster(node.api.api_client())
        loops = [ClientLoop(node.topo.pods[1], ip, 80, stop_file=tmp_path / f"loop-{n}.stop", duration=60, timeout=1.0)
                 for n, ip in (("web", IP), ("bad", "10.96.0.40"))]
        try:
            for loop in loops:
                loop.wait_for(20)
            outcome = prepare(cluster, [Ref(NS, "web")], namespace=c.DEFAULT_AGENT_NAMESPACE, timeout=20)
            assert outcome.agents == 1 and outcome.prepared == [Ref(NS, "web")], outcome
            assert node.proxy()["handover"]["prepared"] == [f"{NS}/web"]  # the node's own view
            # Make before break: our redirect is in while kube-proxy still has its rule.
            assert Key(4, IP, 80) in node.kernel_keys()
            assert f"{IP} . tcp . 80 : goto service-" in standin.applied  # type: ignore[operator]
            start = len(loops[0].records)
            loops[0].wait_for(20)
            assert all(r.via == "envoy" for r in loops[0].records[start + 5:]), "not on Envoy before the label"
            node.core.patch_namespaced_service("web", NS, {"metadata": {
                "labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME},
                "annotations": {c.HANDOVER_ANNOTATION: None}}})
            standin.wait_for(lambda rs: IP not in rs, timeout=10)  # kube-proxy lets go (after us)
            loops[0].wait_for(40)
            # The refused Service: never prepared, the mark is removed, kube-proxy keeps it.
            aborted = prepare(cluster, [Ref(NS, "bad")], namespace=c.DEFAULT_AGENT_NAMESPACE, timeout=3)
            assert aborted.not_prepared == {Ref(NS, "bad"): ["sandbox-node"]}, aborted
            svc = node.core.read_namespaced_service("bad", NS)
            assert c.HANDOVER_ANNOTATION not in (svc.metadata.annotations or {})
            assert c.SERVICE_PROXY_NAME_LABEL not in (svc.metadata.labels or {})
            loops[1].wait_for(20)
        finally:
            records = [loop.stop() for loop in loops]
        for recs in records:
            failed = [r for r in recs if not r.ok]
            assert not failed, failed[:5]
        assert all(r.via == "direct" for r in records[1]), "the aborted Service left kube-proxy"


def test_uninstall_hands_everything_back_and_the_agents_clean_up(tmp_path: Path) -> None:
    """Issue 15's uninstall path under load: `lightpath uninstall` (webhook configuration deleted, labels
    removed, every live agent at 0 redirects) then the DaemonSet deleted: 0 failed requests, kube-proxy (the
    stand-in) serving, no lightpath table left on the node."""
    from kubernetes import client

    from cli.kube import Cluster
    from cli.uninstall import uninstall
    from sandbox.api.resources import MUTATING_WEBHOOKS
    from sandbox.node.netns import nft

    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "lightpath-redirector"},
          "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
              "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "r", "image": "i"}]}}}}
    with envoy_node(tmp_path, agent_args=("--daemonset", "lightpath-redirector")) as node, \
            StandinSync(node.api.api_client(), node.topo.node.name, watch_timeout=5, min_sync_period=1.0) as standin:
        apps = client.AppsV1Api(node.api.api_client())
        apps.create_namespaced_daemon_set(c.DEFAULT_AGENT_NAMESPACE, ds)
        node.api.operations.create(MUTATING_WEBHOOKS, None, {"metadata": {
            "name": "lightpath", "labels": {"app.kubernetes.io/part-of": "lightpath"}}, "webhooks": []})
        node.serve(0, "http", 4, port=8080)
        node.service("web", [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
        node.endpoints("web", {"http": 8080}, [0])
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="migrated")
        loop = ClientLoop(node.topo.pods[1], IP, 80, stop_file=tmp_path / "loop.stop", duration=60, timeout=1.0)
        said: list[str] = []
        try:
            loop.wait_for(20)
            code = uninstall(Cluster(node.api.api_client()), proxy_name=c.DEFAULT_PROXY_NAME,
                             agent_namespace=c.DEFAULT_AGENT_NAMESPACE, timeout=30, say=said.append)
            assert code == 0, said
            assert "lightpath" not in [w.metadata.name for w in client.AdmissionregistrationV1Api(
                node.api.api_client()).list_mutating_webhook_configuration().items]
            assert c.SERVICE_PROXY_NAME_LABEL not in (node.core.read_namespaced_service("web", NS).metadata.labels or {})
            # kube-proxy serves it: the agent released its redirect only once the rule was in the kernel
            # (wait_for only covers the stand-in thread's bookkeeping after its own apply)
            standin.wait_for(lambda rs: f"{IP} . tcp . 80 : goto service-" in rs, timeout=5)
            assert Key(4, IP, 80) not in node.kernel_keys()  # released only after that
            apps.delete_namespaced_daemon_set("lightpath-redirector", c.DEFAULT_AGENT_NAMESPACE)
            wait_until(lambda: node.agent.logged("DaemonSet is being deleted"), timeout=10, what="deletion seen")
            assert node.agent.signal(signal.SIGTERM) == 0  # the kubelet stops the agent
            assert "lightpath" not in nft(node.topo.node.name, "list tables")
            loop.wait_for(40)
        finally:
            records = loop.stop()
        failed = [r for r in records if not r.ok]
        assert not failed, failed[:5]
        assert records[-1].via == "direct"
        print("\n" + "\n".join(said))
