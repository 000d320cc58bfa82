"""End to end: the sandbox API server, ``lightpath-redirector run`` as a process in the node netns, real
nftables, and real TCP from pod and node namespaces landing on a stand-in proxy on port 1666."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from redirector.model import Key
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES, SERVICES
from sandbox.node.netns import Topology, nft, run_in_netns
from sandbox.node.traffic import (
    Listener,
    TrafficError,
    tcp_listener,
    tcp_request,
    udp_listener,
    udp_request,
    wait_until,
)
from shared import constants as c
from tests.redirector.agentproc import AgentProcess
from tests.redirector.conftest import marked_connect, nft_backend

pytestmark = pytest.mark.root
LABELS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


class Env:
    def __init__(self, topo: Topology, api: SandboxApiServer, agent: AgentProcess) -> None:
        self.topo, self.api, self.agent = topo, api, agent
        self.core = client.CoreV1Api(api.api_client())
        self.kernel = nft_backend(topo.node.name)

    def create(self, name: str, *, labelled: bool = True, **spec: Any) -> dict[str, Any]:
        spec.setdefault("ports", [{"name": "http", "port": 80}])
        body = {"metadata": {"name": name, "labels": dict(LABELS) if labelled else {}}, "spec": spec}
        obj, _ = self.api.operations.create(SERVICES, "shop", body)
        return obj

    def redirected(self, ip: str, port: int, netns: Any = None) -> bool:
        """A connection from a pod (or ``netns``) to ip:port lands on the proxy, which sees ip:port as original."""
        try:
            reply = tcp_request(netns or self.topo.pods[0], ip, port, timeout=1)
        except TrafficError:
            return False
        return bool(reply["server"] == "proxy" and reply["original_dst"] == [ip, port])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Topology(pods=2, prefix="lpr") as topo, SandboxApiServer(bookmark_interval=0.2) as api:
        api.operations.create(NAMESPACES, None, {"metadata": {"name": "shop"}})
        proxies: list[Listener] = [tcp_listener(topo.node, 1666, 4, name="proxy"),
                                   tcp_listener(topo.node, 1666, 6, name="proxy")]
        agent = AgentProcess(topo.node, api, tmp_path, ["--resync-period", "1", "--watch-read-timeout", "1.5",
                                                        "--watch-timeout", "30"])
        try:
            agent.start().wait_synced()
            yield Env(topo, api, agent)
        finally:
            agent.close()
            for p in proxies:
                p.stop()


def test_cluster_ips_dual_stack_from_pods_and_from_the_node(env: Env) -> None:
    svc = env.create("web", ipFamilyPolicy="RequireDualStack")
    v4, v6 = svc["spec"]["clusterIPs"]
    assert ":" in v6
    wait_until(lambda: env.redirected(v4, 80), what="IPv4 ClusterIP from a pod")
    assert env.redirected(v6, 80)
    assert env.redirected(v4, 80, env.topo.node)  # the output path
    assert env.redirected(v6, 80, env.topo.node)


def test_external_ips_load_balancer_ingress_and_node_ports(env: Env) -> None:
    svc = env.create("lb", type="LoadBalancer", externalIPs=["192.0.2.10"])
    node_port = svc["spec"]["ports"][0]["nodePort"]
    env.core.patch_namespaced_service_status("lb", "shop", {"status": {"loadBalancer": {"ingress": [
        {"ip": "198.51.100.10"}, {"hostname": "lb.example.com"}]}}})
    wait_until(lambda: env.redirected("198.51.100.10", 80), what="LB ingress IP")
    assert env.redirected("192.0.2.10", 80)
    assert env.redirected(svc["spec"]["clusterIP"], 80)
    assert env.redirected(env.topo.node_ip, node_port)
    node_ip6 = env.topo.node_ip6
    assert node_ip6 is not None and not env.redirected(node_ip6, node_port)  # an IPv4-only Service


def test_label_removed_or_service_deleted_removes_the_redirect(env: Env) -> None:
    a, b = env.create("a")["spec"]["clusterIP"], env.create("b")["spec"]["clusterIP"]
    wait_until(lambda: env.redirected(a, 80) and env.redirected(b, 80))
    env.core.patch_namespaced_service("a", "shop", {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}}})
    env.core.delete_namespaced_service("b", "shop")
    wait_until(lambda: not ({Key(4, a, 80), Key(4, b, 80)} & env.kernel.read()), what="entries removed")
    assert not env.redirected(a, 80) and not env.redirected(b, 80)


def test_unlabelled_udp_and_proxy_marked_traffic_are_untouched(env: Env) -> None:
    plain = env.create("plain", labelled=False)["spec"]["clusterIP"]
    dns = env.create("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                   {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])["spec"]["clusterIP"]
    udp_proxy = udp_listener(env.topo.node, 1666, 4, name="proxy")
    try:
        wait_until(lambda: env.redirected(dns, 53), what="TCP port of a mixed Service")
        assert Key(4, plain, 80) not in env.kernel.read() and not env.redirected(plain, 80)
        with pytest.raises(TrafficError):  # were UDP redirected, the UDP "proxy" would answer
            udp_request(env.topo.pods[0], dns, 53, timeout=0.5)
        marked = run_in_netns(env.topo.node.name, marked_connect, dns, 53, c.DEFAULT_PROXY_MARK, 0.5)
        assert not (isinstance(marked, dict) and marked["server"] == "proxy")
        assert env.agent.logged("ports the proxy cannot serve")
    finally:
        udp_proxy.stop()


def test_api_server_down_and_back_keeps_rules_and_converges(env: Env) -> None:
    kept = env.create("kept")["spec"]["clusterIP"]
    wait_until(lambda: env.redirected(kept, 80))
    env.api.stop()
    wait_until(lambda: env.agent.logged("watch failed"), what="the agent noticed")
    assert env.redirected(kept, 80)  # rules kept while the API is away
    later = env.create("later")["spec"]["clusterIP"]
    env.api.start()
    wait_until(lambda: env.redirected(later, 80), timeout=30, what="converged after the API came back")
    assert env.redirected(kept, 80)


def test_410_gone_relists(env: Env) -> None:
    old = env.create("old")["spec"]["clusterIP"]
    wait_until(lambda: env.redirected(old, 80))
    env.api.stop()
    new = env.create("new")["spec"]["clusterIP"]
    env.api.operations.delete(SERVICES, "shop", "old", None)
    env.api.compact()
    env.api.start()
    wait_until(lambda: env.redirected(new, 80) and not env.redirected(old, 80), timeout=30, what="re-listed")
    assert env.agent.logged("410 Gone")


def test_a_stalled_watch_is_restarted(env: Env) -> None:
    env.api.stall_watches(True)
    try:
        ip = env.create("during-stall")["spec"]["clusterIP"]
        wait_until(lambda: env.agent.logged("watch failed", reason="stalled"), timeout=10, what="stall detected")
    finally:
        env.api.stall_watches(False)
    wait_until(lambda: env.redirected(ip, 80), timeout=15, what="caught up")


def test_our_table_flushed_by_hand_is_repaired_by_the_resync(env: Env) -> None:
    ip = env.create("web")["spec"]["clusterIP"]
    wait_until(lambda: env.redirected(ip, 80))
    nft(env.topo.node.name, "flush table inet lightpath")
    wait_until(lambda: env.agent.logged("resync repaired drift") >= 1, timeout=10)
    wait_until(lambda: env.redirected(ip, 80))
    nft(env.topo.node.name, "delete table inet lightpath")
    wait_until(lambda: env.agent.logged("resync repaired drift") >= 2 and env.redirected(ip, 80), timeout=10)


def test_restart_with_existing_rules_never_drops_a_connection(env: Env) -> None:
    ip = env.create("web")["spec"]["clusterIP"]
    wait_until(lambda: env.redirected(ip, 80))
    results: list[bool] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            results.append(env.redirected(ip, 80))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(results) >= 3)
        assert env.agent.signal(signal.SIGTERM) == 0  # leaves the rules in place...
        assert env.kernel.read() == {Key(4, ip, 80)}
        count = len(results)
        wait_until(lambda: len(results) >= count + 3)
        env.agent.start().wait_synced()  # ...and the next agent adopts them
        count = len(results)
        wait_until(lambda: len(results) >= count + 3)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert results and all(results), f"{results.count(False)} of {len(results)} connections missed the redirect"


def bulk_create(api: SandboxApiServer, n: int, *, port: int = 80, start: int = 0) -> None:
    for i in range(start, start + n):
        api.operations.create(SERVICES, "shop", {"metadata": {"name": f"s{i}", "labels": dict(LABELS)},
                                                 "spec": {"ipFamilyPolicy": "RequireDualStack",
                                                          "ports": [{"name": "http", "port": port}]}})


def all_keys(api: SandboxApiServer, core: client.CoreV1Api) -> set[Key]:
    import json

    items = json.loads(core.list_namespaced_service("shop", _preload_content=False).data)["items"]
    from redirector.desired import desired_state

    return set(desired_state(items).entries)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_large_sync_leaves_old_or_new(env: Env) -> None:
    n = 3000
    bulk_create(env.api, n)
    old = all_keys(env.api, env.core)
    wait_until(lambda: env.kernel.read() == old, timeout=60, what="old state programmed")
    env.agent.signal(signal.SIGTERM)
    for i in range(n):  # the next agent must move every entry: port 80 -> 81
        env.api.operations.patch(SERVICES, "shop", f"s{i}", None, "application/merge-patch+json",
                                 b'{"spec":{"ports":[{"name":"http","port":81}]}}')
    new = all_keys(env.api, env.core)
    assert len(new) == len(old) == 2 * n and not (new & old)
    env.agent.start()
    wait_until(lambda: env.agent.alive() and env.agent.logged("listed", what="services"), timeout=30)
    env.agent.signal(signal.SIGKILL)  # right after the list: during the computation or the transaction
    seen = env.kernel.read()
    assert seen in (old, new), f"a mix: {len(seen & old)} old and {len(seen & new)} new entries"
    env.agent.start().wait_synced()
    wait_until(lambda: env.kernel.read() == new, timeout=30)


@pytest.mark.slow
def test_ten_thousand_dual_stack_services(env: Env) -> None:
    n = 10_000
    env.agent.signal(signal.SIGTERM)
    bulk_create(env.api, n)
    want = all_keys(env.api, env.core)
    assert len(want) == 2 * n
    env.agent.start().wait_synced(timeout=60)
    wait_until(lambda: env.kernel.read() == want, timeout=30, what="20,000 entries")
    some = sorted(k for k in want if k.family == 6)[1234]
    assert some.ip and env.redirected(some.ip, 80)
    bulk_create(env.api, 1, port=8080, start=n)  # and it keeps up incrementally at that size
    wait_until(lambda: len(env.kernel.read()) == 2 * n + 2, timeout=10)
