"""Handover under load on a node with the agent, a real Envoy and the kube-proxy STAND-IN (kube-proxy v1.33's
nftables layout, minSyncPeriod 1 s, drops traffic to ClusterIPs it does not know): rollbacks keep the
redirect until kube-proxy's rule is visible (make-before-break), so a client opening a new connection every
5 ms sees no failure and no stall."""

from __future__ import annotations

from pathlib import Path

import pytest

from redirector.model import Key
from sandbox.client_loop import ClientLoop
from sandbox.kubeproxy import StandinSync
from sandbox.traffic import wait_until
from shared import constants as c
from tests.e2e.envoynode import CLUSTER_IPS, NS, envoy_node

pytestmark = pytest.mark.root
IP = CLUSTER_IPS[0]
LABEL = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}}}
UNLABEL = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}}}


def test_rollback_and_migration_under_load_lose_no_request(tmp_path: Path) -> None:
    run_cycles(tmp_path, agent_args=())


def run_cycles(tmp_path: Path, agent_args: tuple[str, ...]) -> None:
    with envoy_node(tmp_path, agent_args=agent_args) as node, StandinSync(node.api.api_client(), node.topo.node.name, watch_timeout=5,
                                                   min_sync_period=1.0) as standin:
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
                standin.wait_for(lambda rs: f"{IP} . tcp . 80 : goto service-" in rs, timeout=10)
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
