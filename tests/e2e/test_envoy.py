"""The node-local Envoy: Services + EndpointSlices -> Envoy config (pure), and a real Envoy behind a REDIRECT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.envoy import UNMATCHED, served, translate
from sandbox.envoy_process import EnvoyProcess
from sandbox.netns import Topology, nft
from sandbox.traffic import TrafficError, http_listener, http_request, tcp_listener, tcp_request, wait_until
from shared import constants as c

CLUSTER_IP, CLUSTER_IP6 = "10.96.0.10", "fd00:10:96::10"


def service(name: str = "web", ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    ports = ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP", "appProtocol": "http"}]
    return {
        "metadata": {"name": name, "namespace": "demo", "labels": spec.pop("labels", {})},
        "spec": {"clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP], "ports": ports, **spec},
    }


def endpoint_slice(
    ips: list[str], ports: dict[str, int], name: str = "web", family: str = "IPv4", ready: bool | None = True
) -> dict[str, Any]:
    conditions = {} if ready is None else {"ready": ready}
    return {
        "metadata": {"name": f"{name}-{family}", "namespace": "demo", "labels": {"kubernetes.io/service-name": name}},
        "addressType": family,
        "endpoints": [{"addresses": [ip], "conditions": conditions} for ip in ips],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
    }


def chains(resources: Any, family: int = 4) -> list[dict[str, Any]]:
    listener = next(x for x in resources.listeners if x["name"] == f"lightpath_ipv{family}")
    return list(listener["filter_chains"])


# -- the pure translation -----------------------------------------------------------------------------


def test_http_port_gets_http_connection_manager_and_tcp_port_gets_tcp_proxy() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c"}, {"name": "db", "port": 5432}])
    res = translate([svc], [endpoint_slice(["10.244.0.10", "10.244.0.11"], {"http": 8080, "db": 5433})])
    by_port = {ch["filter_chain_match"]["destination_port"]: ch for ch in chains(res)}
    assert by_port[80]["filter_chain_match"]["prefix_ranges"] == [{"address_prefix": CLUSTER_IP, "prefix_len": 32}]
    hcm = by_port[80]["filters"][0]["typed_config"]
    assert by_port[80]["filters"][0]["name"] == "envoy.filters.network.http_connection_manager"
    assert hcm["use_remote_address"] is True and hcm["generate_request_id"] is True
    assert by_port[5432]["filters"][0]["name"] == "envoy.filters.network.tcp_proxy"
    clusters = {cl["name"]: cl for cl in res.clusters}
    endpoints = clusters["demo_web_5432"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "10.244.0.10", "port_value": 5433},
        {"address": "10.244.0.11", "port_value": 5433},
    ]
    mark = clusters["demo_web_80"]["upstream_bind_config"]["socket_options"][0]
    assert (mark["name"], mark["int_value"]) == (36, c.DEFAULT_PROXY_MARK)


def test_only_ready_endpoints_and_the_named_port() -> None:
    slices = [
        endpoint_slice(["10.244.0.10"], {"http": 8080}, ready=True),
        endpoint_slice(["10.244.0.11"], {"http": 8080}, ready=False) | {"metadata": {"name": "b", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}}},
        endpoint_slice(["10.244.0.12"], {"other": 9}, name="web") | {"metadata": {"name": "c", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}}},
        endpoint_slice(["10.244.0.13"], {"http": 8080}, name="not-web"),
    ]
    res = translate([service()], slices)
    assert res.routes == ("10.96.0.10:80 -> demo_web_80 (http, 1 endpoints)",)


def test_dual_stack_nodeport_and_external_ips_each_get_a_chain() -> None:
    svc = service(
        ports=[{"name": "", "port": 80, "nodePort": 30080}],
        type="NodePort",
        clusterIPs=[CLUSTER_IP, CLUSTER_IP6],
        ipFamilies=["IPv4", "IPv6"],
        externalIPs=["192.0.2.7"],
    )
    res = translate([svc], [])
    v4 = sorted(json.dumps(ch["filter_chain_match"], sort_keys=True) for ch in chains(res, 4))
    assert v4 == sorted(
        json.dumps(m, sort_keys=True)
        for m in (
            {"destination_port": 80, "prefix_ranges": [{"address_prefix": CLUSTER_IP, "prefix_len": 32}]},
            {"destination_port": 80, "prefix_ranges": [{"address_prefix": "192.0.2.7", "prefix_len": 32}]},
            {"destination_port": 30080},
        )
    )
    assert {ch["filter_chain_match"].get("prefix_ranges", [{}])[0].get("address_prefix") for ch in chains(res, 6)} == {
        CLUSTER_IP6,
        None,
    }
    assert translate([svc], [], ipv6=False).listeners[0]["name"] == "lightpath_ipv4"
    assert len(translate([svc], [], ipv6=False).listeners) == 1


def test_which_services_envoy_knows() -> None:
    ours = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
    assert served(service())  # eligible, not yet labelled: known ahead of the redirect
    assert served(service(labels=ours))
    assert not served(service(labels={c.SERVICE_PROXY_NAME_LABEL: "other-proxy"}))
    assert not served(service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    # Labelled by hand although mixed: the redirector redirects its TCP port, so Envoy must answer it.
    mixed = service(ports=[{"name": "a", "port": 80}, {"name": "b", "port": 53, "protocol": "UDP"}], labels=ours)
    assert served(mixed) and translate([mixed], []).routes == ("10.96.0.10:80 -> demo_web_80 (tcp, 0 endpoints)",)


def test_no_services_still_a_valid_listener_and_stable_output() -> None:
    empty = translate([], [])
    assert all(x["filter_chains"] == [] and x["default_filter_chain"] for x in empty.listeners)
    assert [cl["name"] for cl in empty.clusters] == [UNMATCHED]
    a = translate([service("a"), service("b", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"])], [])
    b = translate([service("b", clusterIP="10.96.0.11", clusterIPs=["10.96.0.11"]), service("a")], [])
    assert a == b


# -- a real Envoy ---------------------------------------------------------------------------------------


REDIRECT = """
table inet lptest {{
  chain prerouting {{
    type nat hook prerouting priority -110; policy accept;
    ip daddr {ip} tcp dport {{ 80, 9000 }} redirect to :{proxy}
    ip6 daddr {ip6} tcp dport 80 redirect to :{proxy}
  }}
  chain output {{
    type nat hook output priority -110; policy accept;
    meta mark {mark:#x} return
    ip daddr {backend} tcp dport {backend_port} redirect to :{proxy}
  }}
}}
"""


@pytest.mark.root
def test_real_envoy_behind_a_redirect(tmp_path: Path) -> None:
    with Topology(pods=2) as topo:
        backend, client = topo.pods
        web = http_listener(backend, 8080, 4, name="web")
        web6 = http_listener(backend, 8080, 6, name="web6")
        raw = tcp_listener(backend, 9001, 4, name="raw")
        svc = service(
            ports=[{"name": "http", "port": 80, "appProtocol": "http"}, {"name": "raw", "port": 9000}],
            clusterIPs=[CLUSTER_IP, CLUSTER_IP6],
        )
        slices = [
            endpoint_slice([topo.pod_ips[0]], {"http": web.port, "raw": raw.port}),
            endpoint_slice([topo.pod_ips6[0]], {"http": web6.port}, family="IPv6"),
        ]
        envoy = EnvoyProcess(topo.node, tmp_path).start(translate([svc], slices))
        try:
            # The output rule would send Envoy's own upstream connection back to Envoy, were it not marked.
            nft(
                topo.node.name,
                REDIRECT.format(
                    ip=CLUSTER_IP, ip6=CLUSTER_IP6, proxy=c.DEFAULT_PROXY_PORT, mark=c.DEFAULT_PROXY_MARK,
                    backend=topo.pod_ips[0], backend_port=web.port,
                ),
            )
            before = envoy.counter("cluster.demo_web_80.upstream_rq_total")
            resp = http_request(client, CLUSTER_IP, 80, "/hello")
            assert resp["status"] == 200, resp
            echoed = json.loads(resp["body"])
            assert echoed["server"] == "web" and echoed["path"] == "/hello"
            assert echoed["headers"]["x-request-id"]
            assert "x-envoy-expected-rq-timeout-ms" in echoed["headers"]
            assert echoed["headers"]["x-forwarded-for"] == topo.pod_ips[1]  # use_remote_address
            assert envoy.counter("cluster.demo_web_80.upstream_rq_total") == before + 1

            resp6 = http_request(client, CLUSTER_IP6, 80, "/v6")
            assert json.loads(resp6["body"])["server"] == "web6"

            # Plain TCP port: tcp_proxy; the backend sees Envoy (the node) as its peer.
            reply = tcp_request(client, CLUSTER_IP, 9000, payload=b"ping")
            assert reply["server"] == "raw" and reply["echo"] == "ping"
            assert reply["peer"][0] == topo.node_ip
            assert envoy.counter("cluster.demo_web_9000.upstream_cx_total") >= 1

            # Config changes without a restart: no ready endpoint -> Envoy answers 503 itself.
            pid = envoy.proc.pid if envoy.proc else None
            not_ready = [endpoint_slice([topo.pod_ips[0]], {"http": web.port, "raw": raw.port}, ready=False)]
            assert envoy.update(translate([svc], not_ready))
            assert http_request(client, CLUSTER_IP, 80)["status"] == 503
            assert envoy.update(translate([svc], slices))
            assert http_request(client, CLUSTER_IP, 80)["status"] == 200
            assert envoy.proc is not None and envoy.proc.pid == pid
            assert not envoy.update(translate([svc], slices))  # unchanged: files not rewritten

            # Service gone: its redirected connections land on the default chain and are closed.
            assert envoy.update(translate([], []))
            with pytest.raises(TrafficError):
                http_request(client, CLUSTER_IP, 80, timeout=2)
            wait_until(lambda: envoy.counter(f"cluster.{UNMATCHED}.upstream_cx_none_healthy") >= 1, 5)
        finally:
            envoy.stop()
