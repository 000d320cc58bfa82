"""The control plane for real: ``lightpath-redirector run`` programs a real Envoy over Delta ADS, and the
kernel redirect of a Service appears only once Envoy serves it. Real TCP through network namespaces."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from redirector.model import Key
from redirector.node import TEST_REFUSE_ENV
from sandbox.node.traffic import TrafficError, http_request, tcp_request, wait_until
from tests.e2e.envoynode import CLUSTER_IPS, HTTP_PORTS, NS, EnvoyNode, envoy_node

pytestmark = pytest.mark.root


def via_envoy(node: EnvoyNode, source: object, ip: str, port: int) -> dict[str, object]:
    reply = http_request(source, ip, port, "/hello")  # type: ignore[arg-type]
    assert reply["status"] == 200, reply
    body: dict[str, object] = json.loads(reply["body"])
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert "x-request-id" in headers and "x-lightpath-cluster" not in headers, headers  # Envoy's HCM, header gone
    return body


def test_http_and_tcp_services_dual_stack_from_a_pod_and_from_the_node(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        want = node.web_and_db()
        wait_until(lambda: want <= node.kernel_keys(), timeout=20, what="all four redirects, after Envoy's ACK")
        for source in (node.topo.pods[0], node.topo.node):
            for ip in CLUSTER_IPS:
                body = via_envoy(node, source, ip, 80)
                assert body["server"] == "pod1"
            for ip in ("10.96.0.20", "fd00:10:96::20"):
                reply = tcp_request(source, ip, 5432)
                assert reply["server"] == "pod2", reply
        assert node.envoy.counter("cluster.shop_db_5432_ipv6.upstream_cx_total") >= 2  # the proxy, not the kernel
        proxy = node.proxy()
        assert proxy["in_sync"] is True and proxy["services_served"] == 2, proxy
        status, ready = node.debug("/readyz")
        assert status == 200 and ready["proxyInSync"] is True, ready


def test_endpoint_changes_are_served_without_a_failed_connection(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        ports = [node.serve(i, "http", 4, port=8080).port for i in range(3)]
        node.service("web", [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}])
        node.endpoints("web", {"http": ports[0]}, [0])
        wait_until(lambda: Key(4, CLUSTER_IPS[0], 80) in node.kernel_keys(), timeout=20, what="redirect")
        seen: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    seen.append(str(via_envoy(node, node.topo.node, CLUSTER_IPS[0], 80)["server"]))
                except (AssertionError, TrafficError) as exc:
                    failures.append(repr(exc))
                time.sleep(0.005)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            wait_until(lambda: "pod0" in seen, what="pod0 serving")
            node.endpoints("web", {"http": 8080}, [0, 1, 2])  # scale 1 -> 3
            wait_until(lambda: {"pod1", "pod2"} <= set(seen[-60:]), timeout=15, what="all three pods serving")
            node.endpoints("web", {"http": 8080}, [1, 2])  # one removed
            mark = len(seen)
            wait_until(lambda: len(seen) > mark + 40, timeout=15, what="requests after the removal")
            settled = len(seen)
            wait_until(lambda: len(seen) > settled + 40, timeout=15, what="more requests")
            assert "pod0" not in seen[settled:], seen[settled:]
            node.endpoints("web", {"http": 8080}, [1, 2], ready=[True, False])  # pod2 not ready
            settled2 = len(seen)
            wait_until(lambda: len(seen) > settled2 + 40, timeout=15, what="requests after not-ready")
            later = len(seen)
            wait_until(lambda: len(seen) > later + 40, timeout=15, what="more requests")
            assert set(seen[later:]) == {"pod1"}, set(seen[later:])
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not failures, failures[:5]


def test_a_service_envoy_refuses_stays_unredirected_and_the_others_proceed(tmp_path: Path) -> None:
    with envoy_node(tmp_path, agent_env={TEST_REFUSE_ENV: f"{NS}/bad"}) as node:
        good = node.serve(0, "http", 4)
        node.service("bad", HTTP_PORTS, ips=("10.96.0.30",))
        node.endpoints("bad", {"http": good.port}, [0])
        node.service("good", HTTP_PORTS, ips=("10.96.0.31",))
        node.endpoints("good", {"http": good.port}, [0])
        wait_until(lambda: Key(4, "10.96.0.31", 80) in node.kernel_keys(), timeout=20, what="the good Service")
        via_envoy(node, node.topo.pods[1], "10.96.0.31", 80)

        def refused() -> bool:
            rows = node.proxy("bad")["services"]
            return bool(rows) and any(k["refused"] for k in rows[0]["keys"])

        wait_until(refused, timeout=20, what="the refusal reported per Service")
        row = node.proxy("bad")["services"][0]["keys"][0]
        assert "connect_timeout" in row["refused"].lower() or "duration" in row["refused"].lower(), row
        assert row["served"] is False
        assert Key(4, "10.96.0.30", 80) not in node.kernel_keys()
        assert node.agent.logged("Envoy refused a configuration") >= 1
        status, metrics = node.debug("/metrics")
        assert 'lightpath_controlplane_nacks_total{type="cds"}' in metrics and status == 200
        # The others keep changing normally: a new Service is served while "bad" stays refused.
        node.service("later", HTTP_PORTS, ips=("10.96.0.32",))
        node.endpoints("later", {"http": good.port}, [0])
        wait_until(lambda: Key(4, "10.96.0.32", 80) in node.kernel_keys(), timeout=20, what="a later Service")
        assert Key(4, "10.96.0.30", 80) not in node.kernel_keys()
        # Fixing it recovers: the agent restarted without the hook sends a version Envoy takes.
        node.agent.stop()
        node.agent.start()
        wait_until(lambda: Key(4, "10.96.0.30", 80) in node.kernel_keys(), timeout=30, what="the fixed Service")
        via_envoy(node, node.topo.pods[1], "10.96.0.30", 80)


def test_envoy_restart_and_agent_restart(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        web = node.serve(0, "http", 4)
        node.service("web", HTTP_PORTS)
        node.endpoints("web", {"http": web.port}, [0])
        key = Key(4, CLUSTER_IPS[0], 80)
        wait_until(lambda: key in node.kernel_keys(), timeout=20, what="redirect")
        node.envoy.kill()
        assert key in node.kernel_keys()  # the redirect stays while Envoy is away (a later issue adds a fallback)
        node.envoy.start()
        wait_until(lambda: node.proxy()["in_sync"], timeout=20, what="the new Envoy to receive everything")
        # Meanwhile the kernel fallback served the Service; it hands back to Envoy once Envoy serves again.
        wait_until(lambda: not node.proxy()["fallback"]["active"], timeout=20, what="back from the kernel fallback")
        wait_until(lambda: http_request(node.topo.pods[1], CLUSTER_IPS[0], 80)["status"] == 200, timeout=10,
                   what="traffic through the new Envoy")
        # The agent restarted under a client loop: Envoy keeps its configuration, the kernel its rules.
        failures: list[str] = []
        done: list[int] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    via_envoy(node, node.topo.pods[1], CLUSTER_IPS[0], 80)
                    done.append(1)
                except (AssertionError, TrafficError) as exc:
                    failures.append(repr(exc))
                time.sleep(0.005)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            wait_until(lambda: len(done) > 20, what="the loop running")
            node.agent.stop()
            before = len(done)
            wait_until(lambda: len(done) > before + 20, what="requests while the agent is away")
            node.agent.start()
            node.agent.wait_synced()
            wait_until(lambda: node.proxy()["in_sync"], timeout=20, what="Envoy back in sync with the new agent")
            after = len(done)
            wait_until(lambda: len(done) > after + 20, what="requests after the restart")
        finally:
            stop.set()
            thread.join(timeout=10)
        assert not failures, failures[:5]
        assert key in node.kernel_keys()


def test_the_kernel_entry_appears_only_after_envoy_acked_it(tmp_path: Path) -> None:
    with envoy_node(tmp_path, start_envoy=False) as node:
        web = node.serve(0, "http", 4)
        node.service("web", HTTP_PORTS)
        node.endpoints("web", {"http": web.port}, [0])
        key = Key(4, CLUSTER_IPS[0], 80)
        # Deterministic: the control plane has translated the Service (it is in the report), the agent
        # counts its redirect as waiting for Envoy, and the kernel does not hold it.
        wait_until(lambda: node.proxy("web")["services"] and node.proxy()["gated_entries"] == 1, timeout=20,
                   what="the Service translated and its redirect gated")
        assert key not in node.kernel_keys()
        status, ready = node.debug("/readyz")
        assert status == 503 and "no Envoy connected" in str(ready), ready
        node.envoy.start()
        wait_until(lambda: key in node.kernel_keys(), timeout=20, what="the redirect once Envoy ACKed")
        via_envoy(node, node.topo.pods[1], CLUSTER_IPS[0], 80)
        assert node.proxy()["gated_entries"] == 0
