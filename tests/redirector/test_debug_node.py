"""The debug endpoints checked against reality: a real agent (watcher + sync loop) on the sandbox API
server, real nftables in a node netns with a pod, real connections, and the debug server over HTTP.

``DebugNode`` is also used by test_debug_http.py and test_debug_health.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client

from redirector.agent import Agent
from redirector.changes import ChangeTracker
from redirector.debug.app import create_debug_app
from redirector.debug.server import DebugServer
from redirector.debug.settings import DebugSettings
from redirector.debug.source import AgentSource
from redirector.model import Backend, Key
from redirector.watch import ServiceWatcher
from sandbox.api.apiserver import SandboxApiServer
from sandbox.node.netns import Topology
from sandbox.node.traffic import Listener, tcp_listener, tcp_request, wait_until
from shared import constants as c
from shared.kubeapi import Api
from tests.redirector.conftest import nft_backend

pytestmark = pytest.mark.root
NS = "shop"
PROXY_PORT = c.DEFAULT_PROXY_PORT


class DebugNode:
    """Topology (node + 1 pod) + sandbox API + Agent/ServiceWatcher threads + DebugServer on loopback.

    The backend's sockets live in the node netns (``nft_backend``, or ``nsenter`` for iptables) and the
    debug app's netlink queries run there too (``DebugSettings.netns``), so every answer is about the node.
    """

    def __init__(self, backend: str = "nftables", *, resync_period: float = 30.0, health_timeout: float = 60.0,
                 retry_max: float = 10.0, **backend_kwargs: Any) -> None:
        self.topo = Topology(pods=1, prefix="lpr").__enter__()
        try:
            self.api_server = SandboxApiServer().start()
            self.core = client.CoreV1Api(self.api_server.api_client())
            self.core.create_namespace({"metadata": {"name": NS}})
            self.backend = self._backend(backend, backend_kwargs)
            tracker = ChangeTracker((c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME))
            self.watcher = ServiceWatcher(Api(self.api_server.api_client()), tracker, server_timeout=30, read_timeout=5)
            self.agent = Agent(self.backend, proxy_label=(c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME),
                               tracker=tracker, watcher=self.watcher, resync_period=resync_period,
                               retry_max=retry_max, retry_min=0.05)
            self.threads = [threading.Thread(target=self.watcher.run, daemon=True),
                            threading.Thread(target=self.agent.run, daemon=True)]
            for thread in self.threads:
                thread.start()
            self.source = AgentSource(self.agent, sync_thread=self.threads[1])
            self.settings = DebugSettings(port=0, proxy_port=PROXY_PORT, health_timeout=health_timeout,
                                          netns=self.topo.node.name, node="test-node",
                                          agent_config={"backend": backend, "resync_period": resync_period,
                                                        "token": "s3cr3t"})
            self.app = create_debug_app(self.source, self.backend, self.settings)
            self.server = DebugServer(self.app, "127.0.0.1", 0, registry=self.source.registry)
            assert self.server.start(), self.server.error
            self.http = httpx.Client(base_url=self.server.url, timeout=30, trust_env=False)
            self.listeners: list[Listener] = []
        except BaseException:
            self.close()
            raise

    def _backend(self, name: str, kwargs: dict[str, Any]) -> Backend:
        if name == "nftables":
            backend: Backend = nft_backend(self.topo.node.name, proxy_port=PROXY_PORT, **kwargs)
            return backend
        from redirector.iptables import IptablesBackend

        return IptablesBackend(proxy_port=PROXY_PORT, netns=self.topo.node.name, **kwargs)

    @property
    def node(self) -> Any:
        return self.topo.node

    @property
    def pod(self) -> Any:
        return self.topo.pods[0]

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers=headers)

    def json(self, path: str, **params: Any) -> dict[str, Any]:
        resp = self.get(path, **params)
        assert resp.status_code == 200, (resp.status_code, resp.text)
        body: dict[str, Any] = resp.json()
        return body

    def service(self, name: str, *, labelled: bool = True, type_: str = "ClusterIP", dual: bool = False,
                ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Create a Service; returns it as the API stored it (ClusterIPs and NodePorts allocated)."""
        spec: dict[str, Any] = {"type": type_, "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}
        if dual:
            spec.update(ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"])
        labels = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME} if labelled else {}
        body = {"metadata": {"name": name, "namespace": NS, "labels": labels}, "spec": spec}
        resp = self.core.create_namespaced_service(NS, body, _preload_content=False)
        created: dict[str, Any] = json.loads(resp.data)
        return created

    def kernel_keys(self) -> frozenset[Key]:
        return self.backend.read()

    def synced(self, keys: set[Key]) -> bool:
        """The kernel holds ``keys`` and the agent's latest change is applied."""
        return keys <= self.kernel_keys() and not self.agent.tracker.has_work()

    def listen(self, family: int = 4) -> Listener:
        listener = tcp_listener(self.node, PROXY_PORT, family, name="proxy")
        self.listeners.append(listener)
        return listener

    def metric(self, name: str, **labels: str) -> float:
        return self.source.registry.get_sample_value(f"lightpath_redirector_{name}", labels) or 0.0

    def close(self) -> None:
        for step in (lambda: [lst.stop() for lst in getattr(self, "listeners", [])],
                     lambda: self.http.close(), lambda: self.server.stop(),
                     lambda: self.watcher.stop(), lambda: self.agent.stop(),
                     lambda: [t.join(5) for t in self.threads],
                     lambda: self.api_server.stop(), lambda: self.topo.close()):
            with contextlib.suppress(Exception):  # each step runs even when an earlier one failed
                step()


@pytest.fixture(scope="module")
def dn() -> Iterator[DebugNode]:
    node = DebugNode(resync_period=2.0)
    try:
        wait_until(lambda: node.agent.status.first_sync_done, timeout=20, what="first sync")
        yield node
    finally:
        node.close()


def independent_nft_keys(dn: DebugNode) -> set[tuple[int, str | None, int]]:
    """Our table's set elements from ``nft -j list table`` (its own JSON parsing, not nftshape's)."""
    out = dn.node.run(["nft", "-j", "list", "table", "inet", "lightpath"]).stdout
    keys: set[tuple[int, str | None, int]] = set()
    for item in json.loads(out)["nftables"]:
        s = item.get("set")
        if not s:
            continue
        for elem in s.get("elem", []):
            first, port = elem["concat"]
            if s["name"] == "nodeports":
                keys.add((4 if first == "ipv4" else 6, None, port))
            else:
                keys.add((4 if s["name"] == "svc4" else 6, first, port))
    return keys


def all_rule_entries(dn: DebugNode, limit: int) -> list[dict[str, Any]]:
    entries, token = [], None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"continue": token} if token else {})}
        page = dn.json("/debug/rules", **params)
        entries += page["entries"]
        token = page["continue"]
        if not token:
            return entries


def test_rules_equal_what_the_kernel_holds(dn: DebugNode) -> None:
    web = dn.service("rules-web", type_="NodePort", dual=True)
    dn.service("rules-kp", labelled=False)  # unlabelled: kube-proxy's, not ours
    ips = web["spec"]["clusterIPs"]
    node_port = web["spec"]["ports"][0]["nodePort"]
    want = {Key(4, ips[0], 80), Key(6, ips[1], 80), Key(4, None, node_port), Key(6, None, node_port)}
    wait_until(lambda: dn.synced(want), what="web programmed")
    entries = all_rule_entries(dn, limit=2)  # several pages: the tokens chain without gaps or repeats
    got = [(e["family"], e["ip"], e["port"]) for e in entries]
    assert len(got) == len(set(got))
    assert set(got) == independent_nft_keys(dn)
    assert {(k.family, k.ip, k.port) for k in want} <= set(got)
    owners = {e["owner"] for e in entries if e["ip"] == ips[0]}
    assert owners == {f"{NS}/rules-web:http"}
    page = dn.json("/debug/rules", limit=1)
    assert page["backend"] == "nftables" and page["kernel"]["table"] == "inet lightpath"
    assert "dnat ip to 169.254.16.66:1666" in page["kernel"]["ruleset"]
    assert page["kernel"]["redirect_mode"] == "dnat"
    text = dn.get("/debug/rules", format="text").text
    assert f"{ips[0]}:80" in text and "FAMILY" in text and "chain prerouting" in text


def test_services_show_the_desired_state_with_unserved_ports(dn: DebugNode) -> None:
    mixed = dn.service("svc-mixed", ports=[{"name": "tcp", "port": 7000, "protocol": "TCP"},
                                           {"name": "udp", "port": 7000, "protocol": "UDP"}])
    ip = mixed["spec"]["clusterIP"]
    wait_until(lambda: dn.synced({Key(4, ip, 7000)}))
    services = dn.json("/debug/services", limit=5000)["services"]
    mine = next(s for s in services if s["name"] == "svc-mixed")
    assert [e["key"] for e in mine["entries"]] == [f"{ip}:7000"]
    assert mine["unserved"] == [{"port_name": "udp", "protocol": "UDP", "port": 7000}]
    assert all(s["name"] != "rules-kp" for s in services)  # unlabelled Services are not ours
    text = dn.get("/debug/services", headers={"accept": "text/plain"}).text
    assert "UNSERVED" in text and "svc-mixed" in text


def test_diff_shows_a_deleted_element_until_the_resync_repairs_it(dn: DebugNode) -> None:
    svc = dn.service("drift")
    ip = svc["spec"]["clusterIP"]
    key = Key(4, ip, 80)
    wait_until(lambda: dn.synced({key}))
    wait_until(lambda: dn.json("/debug/diff")["in_sync"], what="in sync before meddling")
    seen: dict[str, Any] | None = None
    for _ in range(5):  # a resync may repair before we look: then meddle again
        repairs = dn.metric("drift_repairs_total")
        dn.node.run(["nft", "delete", "element", "inet", "lightpath", "svc4", f"{{ {ip} . 80 }}"])
        body = dn.json("/debug/diff")
        if dn.metric("drift_repairs_total") == repairs and not body["in_sync"]:
            seen = body
            break
        wait_until(lambda: dn.json("/debug/diff")["in_sync"])
    assert seen is not None, "the deleted element never showed in /debug/diff"
    assert seen["missing"] == [{"key": f"{ip}:80", "family": 4, "ip": ip, "port": 80, "match": "address",
                                "kind": "clusterIP", "owner": f"{NS}/drift:http"}]
    assert seen["extra"] == [] and seen["missing_total"] == 1
    assert "missing" in dn.get("/debug/diff", format="text").text
    wait_until(lambda: dn.json("/debug/diff")["in_sync"], timeout=15, what="repaired by the resync")
    assert dn.metric("drift_repairs_total") > repairs
    assert dn.json("/debug/diff") == {"in_sync": True, "missing_total": 0, "extra_total": 0, "missing": [],
                                      "extra": []}


def test_lookup_agrees_with_real_connections(dn: DebugNode) -> None:
    dn.listen(4), dn.listen(6)
    svc = dn.service("look", type_="NodePort", dual=True)
    ip4, ip6 = svc["spec"]["clusterIPs"]
    node_port = svc["spec"]["ports"][0]["nodePort"]
    wait_until(lambda: dn.synced({Key(4, ip4, 80), Key(6, ip6, 80), Key(4, None, node_port)}))
    for ip, port, match in ((ip4, 80, "address"), (ip6, 80, "address"), (dn.topo.node_ip, node_port, "nodePort")):
        answer = dn.json("/debug/lookup", ip=ip, port=port)
        assert answer["redirected"] is True and answer["match"] == match, answer
        assert answer["proxy_port"] == PROXY_PORT
        assert answer["service"] == {"namespace": NS, "name": "look", "port_name": "http",
                                     "kind": "nodePort" if match == "nodePort" else "clusterIP"}
        reply = tcp_request(dn.pod, ip, port)  # the pod's connection lands on the proxy port
        assert reply["server"] == "proxy" and reply["local"][1] == PROXY_PORT, reply
        assert reply["original_dst"] == [ip, port], reply
    # Not redirected: a port on the node nobody claims; the connection reaches that port itself.
    other = tcp_listener(dn.node, 0, 4, name="plain")
    dn.listeners.append(other)
    answer = dn.json("/debug/lookup", ip=dn.topo.node_ip, port=other.port)
    assert answer["redirected"] is False and answer["handled_by"] == "none" and answer["local_address"] is True
    reply = tcp_request(dn.pod, dn.topo.node_ip, other.port)
    assert reply["server"] == "plain" and reply["local"] == [dn.topo.node_ip, other.port], reply
    # An unlabelled Service: kube-proxy's (its ClusterIP is not redirected here).
    kp = dn.service("look-kp", labelled=False)
    answer = dn.json("/debug/lookup", ip=kp["spec"]["clusterIP"], port=80)
    assert answer["redirected"] is False and answer["handled_by"] == "kube-proxy"
    assert answer["service"]["name"] == "look-kp"
    wrong_port = dn.json("/debug/lookup", ip=ip4, port=81)
    assert wrong_port["redirected"] is False and "no TCP port 81" in wrong_port["reason"]
    assert "redirected" in dn.get("/debug/lookup", ip=ip4, port=80, format="text").text


def test_readyz_follows_the_proxy_listener(dn: DebugNode) -> None:
    for listener in dn.listeners:
        listener.stop()
    dn.listeners.clear()
    wait_until(lambda: dn.get("/readyz").status_code == 503, what="not ready without a listener")
    body = dn.get("/readyz").json()
    assert body["listeners"] == [] and f"port {PROXY_PORT}" in body["reason"]
    dn.listen(6)
    wait_until(lambda: dn.get("/readyz").status_code == 200, what="ready with an IPv6 listener")
    assert dn.get("/readyz").json()["listeners"] == [{"family": 6, "address": "::", "port": PROXY_PORT}]
    dn.listeners.pop().stop()
    wait_until(lambda: dn.get("/readyz").status_code == 503, what="not ready again")


def test_healthz_metrics_and_config(dn: DebugNode) -> None:
    health = dn.get("/healthz")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["loopAlive"] and body["ageSeconds"] <= body["thresholdSeconds"]
    metrics = dn.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "lightpath_redirector_sync_duration_seconds_bucket" in metrics.text
    assert 'lightpath_redirector_debug_server_failures_total{reason="bind"} 0.0' in metrics.text
    config = dn.json("/debug/config")
    assert config["agent"]["token"] == "<redacted>" and "s3cr3t" not in dn.get("/debug/config").text
    assert config["debug_server"]["proxy_port"] == PROXY_PORT and config["backend"] == "nftables"
