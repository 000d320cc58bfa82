"""SandboxApiServer through the real `kubernetes` client: CRUD, defaulting, selectors, paging, patches."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import pytest
import urllib3
from kubernetes.client import (
    AdmissionregistrationV1Api,
    ApiException,
    CoreV1Api,
    DiscoveryV1Api,
)

from sandbox.api.apiserver import SandboxApiServer


@pytest.fixture
def core(server: SandboxApiServer) -> CoreV1Api:
    api = CoreV1Api(server.api_client())
    api.create_namespace({"metadata": {"name": "demo", "labels": {"team": "a"}}})
    return api


def svc(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("ports", [{"port": 80}])
    labels = spec.pop("labels", None)
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def error(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.value.body)
    assert body["kind"] == "Status" and body["code"] == exc.value.status
    return body


# ---- defaulting -------------------------------------------------------------------------------------
def test_clusterip_service_is_defaulted_and_allocated(core: CoreV1Api) -> None:
    s = core.create_namespaced_service("demo", svc("web", ports=[{"port": 80, "name": "http"}, {"port": 81, "name": "b"}]))
    assert s.spec.type == "ClusterIP"
    assert s.spec.session_affinity == "None"
    assert [(p.protocol, p.target_port) for p in s.spec.ports] == [("TCP", 80), ("TCP", 81)]
    assert s.spec.ip_families == ["IPv4"] and s.spec.ip_family_policy == "SingleStack"
    assert s.spec.cluster_ip.startswith("10.96.") and s.spec.cluster_ips == [s.spec.cluster_ip]
    assert s.metadata.uid and s.metadata.creation_timestamp and s.metadata.generation == 1
    assert int(s.metadata.resource_version) > 0
    assert s.spec.ports[0].node_port is None


def test_cluster_ips_are_unique_and_requested_ip_honoured(core: CoreV1Api) -> None:
    ips = {core.create_namespaced_service("demo", svc(f"s{i}")).spec.cluster_ip for i in range(20)}
    assert len(ips) == 20
    fixed = core.create_namespaced_service("demo", svc("fixed", clusterIP="10.96.0.10"))
    assert fixed.spec.cluster_ips == ["10.96.0.10"]
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("again", clusterIP="10.96.0.10"))
    assert exc.value.status == 422 and "already allocated" in error(exc)["message"]
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("outside", clusterIP="192.0.2.1"))
    assert exc.value.status == 422 and "10.96.0.0/16" in error(exc)["message"]


def test_dual_stack_and_ipv6(core: CoreV1Api) -> None:
    dual = core.create_namespaced_service("demo", svc("dual", ipFamilyPolicy="PreferDualStack"))
    assert dual.spec.ip_families == ["IPv4", "IPv6"]
    assert dual.spec.cluster_ips[0].startswith("10.96.") and dual.spec.cluster_ips[1].startswith("fd00:10:96::")
    v6first = core.create_namespaced_service(
        "demo", svc("v6first", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6"])
    )
    assert v6first.spec.ip_families == ["IPv6", "IPv4"] and ":" in v6first.spec.cluster_ip
    v6 = core.create_namespaced_service("demo", svc("v6", ipFamilies=["IPv6"]))
    assert v6.spec.ip_family_policy == "SingleStack" and len(v6.spec.cluster_ips) == 1 and ":" in v6.spec.cluster_ip


def test_require_dual_stack_fails_on_single_stack_cluster() -> None:
    with SandboxApiServer(service_cidr_v6=None) as srv:
        api = CoreV1Api(srv.api_client())
        api.create_namespace({"metadata": {"name": "demo"}})
        assert api.create_namespaced_service("demo", svc("p", ipFamilyPolicy="PreferDualStack")).spec.ip_families == ["IPv4"]
        with pytest.raises(ApiException) as exc:
            api.create_namespaced_service("demo", svc("r", ipFamilyPolicy="RequireDualStack"))
        assert exc.value.status == 422 and "dual-stack" in error(exc)["message"]


def test_nodeport_and_loadbalancer_get_unique_node_ports(core: CoreV1Api) -> None:
    np = core.create_namespaced_service(
        "demo", svc("np", type="NodePort", ports=[{"port": 80, "name": "a"}, {"port": 443, "name": "b"}])
    )
    lb = core.create_namespaced_service("demo", svc("lb", type="LoadBalancer"))
    ports = [p.node_port for p in np.spec.ports] + [lb.spec.ports[0].node_port]
    assert len(set(ports)) == 3 and all(30000 <= p <= 32767 for p in ports)
    assert np.spec.external_traffic_policy == "Cluster" and lb.spec.allocate_load_balancer_node_ports is True
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("clash", type="NodePort", ports=[{"port": 1, "nodePort": ports[0]}]))
    assert exc.value.status == 422 and "already allocated" in error(exc)["message"]


def test_headless_and_external_name_get_no_ip(core: CoreV1Api) -> None:
    headless = core.create_namespaced_service("demo", svc("headless", clusterIP="None", selector={"app": "x"}))
    assert headless.spec.cluster_ip == "None" and headless.spec.cluster_ips == ["None"]
    ext = core.create_namespaced_service("demo", svc("ext", type="ExternalName", externalName="example.com", ports=[]))
    assert ext.spec.cluster_ip is None and ext.spec.ip_families is None
    assert core.create_namespaced_service("demo", svc("headless2", clusterIP="None", ports=[])).spec.cluster_ip == "None"


def test_update_keeps_allocations_and_refuses_changing_them(core: CoreV1Api) -> None:
    created = core.create_namespaced_service("demo", svc("np", type="NodePort"))
    body = svc("np", type="NodePort", labels={"x": "y"})  # a PUT that omits clusterIP and nodePort
    replaced = core.replace_namespaced_service("np", "demo", body)
    assert replaced.spec.cluster_ip == created.spec.cluster_ip
    assert replaced.spec.ports[0].node_port == created.spec.ports[0].node_port
    assert replaced.metadata.uid == created.metadata.uid
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_service("np", "demo", {"spec": {"clusterIP": "10.96.0.99"}})
    assert exc.value.status == 422 and "may not change" in error(exc)["message"]
    to_cip = core.patch_namespaced_service("np", "demo", {"spec": {"type": "ClusterIP"}})
    assert to_cip.spec.ports[0].node_port is None


def test_validation_errors_are_422_with_clear_messages(core: CoreV1Api) -> None:
    cases = [
        (svc("noports", ports=[]), "spec.ports: Required value"),
        (svc("dup", ports=[{"port": 80, "name": "a"}, {"port": 80, "name": "b"}]), "Duplicate value"),
        (svc("badproto", ports=[{"port": 80, "protocol": "HTTP"}]), 'Unsupported value: \'HTTP\''),
        (svc("Bad_Name"), "metadata.name"),
        (svc("nameless", ports=[{"port": 80}, {"port": 81}]), "spec.ports[1].name: Required value"),
        (svc("badlabel", labels={"a": "not valid!"}), "metadata.labels"),
    ]
    for body, text in cases:
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_service("demo", body)
        assert exc.value.status == 422, body
        assert text in error(exc)["message"]
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", {"metadata": {}, "spec": {"ports": [{"port": 1}]}})
    assert exc.value.status == 422 and "name" in error(exc)["message"]


def test_namespace_must_exist_and_gets_name_label(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("nowhere", svc("web"))
    assert exc.value.status == 404 and 'namespaces "nowhere" not found' in error(exc)["message"]
    ns = core.read_namespace("demo")
    assert ns.metadata.labels == {"team": "a", "kubernetes.io/metadata.name": "demo"}
    assert ns.status.phase == "Active"


def test_already_exists_not_found_and_delete(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("web"))
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("web"))
    assert exc.value.status == 409 and error(exc)["reason"] == "AlreadyExists"
    deleted = core.delete_namespaced_service("web", "demo")
    assert deleted.metadata.name == "web"
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_service("web", "demo")
    assert exc.value.status == 404 and error(exc)["reason"] == "NotFound"
    with pytest.raises(ApiException) as exc:
        core.delete_namespaced_service("web", "demo")
    assert exc.value.status == 404


def test_deleting_a_namespace_deletes_its_services(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("web"))
    core.delete_namespace("demo")
    assert core.list_service_for_all_namespaces().items == []


def test_stale_resource_version_conflicts(core: CoreV1Api) -> None:
    s = core.create_namespaced_service("demo", svc("web"))
    core.patch_namespaced_service("web", "demo", {"metadata": {"labels": {"a": "b"}}})
    stale = s.to_dict()
    stale["metadata"]["labels"] = {"c": "d"}
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_service("web", "demo", core.api_client.sanitize_for_serialization(s))
    assert exc.value.status == 409 and error(exc)["reason"] == "Conflict"
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_service(
            "web", "demo", {"metadata": {"resourceVersion": s.metadata.resource_version, "labels": {"e": "f"}}}
        )
    assert exc.value.status == 409


def test_noop_update_keeps_resource_version(core: CoreV1Api) -> None:
    s = core.create_namespaced_service("demo", svc("web", labels={"a": "b"}))
    again = core.patch_namespaced_service("web", "demo", {"metadata": {"labels": {"a": "b"}}})
    assert again.metadata.resource_version == s.metadata.resource_version


def test_patch_dialects(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("web", labels={"a": "1", "b": "2"}, ports=[{"port": 80, "name": "http"}]))
    merged = core.patch_namespaced_service(
        "web", "demo", {"metadata": {"labels": {"a": None, "c": "3"}}}, _content_type="application/merge-patch+json"
    )
    assert merged.metadata.labels == {"b": "2", "c": "3"}
    json_patched = core.patch_namespaced_service(
        "web", "demo",
        [{"op": "add", "path": "/metadata/labels/service.kubernetes.io~1service-proxy-name", "value": "lightpath.cloud"},
         {"op": "remove", "path": "/metadata/labels/b"}],
    )
    assert json_patched.metadata.labels == {"c": "3", "service.kubernetes.io/service-proxy-name": "lightpath.cloud"}
    smp = core.patch_namespaced_service("web", "demo", {"spec": {"ports": [{"port": 443, "name": "https"}]}})
    assert sorted(p.port for p in smp.spec.ports) == [80, 443]  # strategic merge: ports merged by port
    replaced = core.patch_namespaced_service(
        "web", "demo", {"spec": {"ports": [{"port": 8080}]}}, _content_type="application/merge-patch+json"
    )
    assert [p.port for p in replaced.spec.ports] == [8080]  # merge patch: lists replaced
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_service("web", "demo", [{"op": "remove", "path": "/metadata/labels/nope"}])
    assert exc.value.status == 422
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_service("web", "demo", [{"op": "test", "path": "/spec/type", "value": "NodePort"}])
    assert exc.value.status == 422


def test_status_subresource_only_touches_status(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("lb", type="LoadBalancer"))
    status = {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}, "spec": {"type": "ClusterIP"}}
    updated = core.patch_namespaced_service_status("lb", "demo", status)
    assert updated.status.load_balancer.ingress[0].ip == "192.0.2.10"
    assert updated.spec.type == "LoadBalancer"
    plain = core.patch_namespaced_service("lb", "demo", {"status": {"loadBalancer": {}}, "metadata": {"labels": {"x": "y"}}})
    assert plain.status.load_balancer.ingress[0].ip == "192.0.2.10"  # the main resource ignores status


# ---- list, selectors, paging ---------------------------------------------------------------------
def test_label_and_field_selectors(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    core.create_namespaced_service("demo", svc("a", labels={"tier": "web", "env": "prod"}))
    core.create_namespaced_service("demo", svc("b", labels={"tier": "db"}))
    core.create_namespaced_service("demo", svc("c"))
    core.create_namespaced_service("other", svc("d", labels={"tier": "web"}))

    def names(**kw: Any) -> list[str]:
        return sorted(s.metadata.name for s in core.list_service_for_all_namespaces(**kw).items)

    assert names() == ["a", "b", "c", "d"]
    assert names(label_selector="tier=web") == ["a", "d"]
    assert names(label_selector="tier==web,env=prod") == ["a"]
    assert names(label_selector="tier!=web") == ["b", "c"]
    assert names(label_selector="tier in (web, db)") == ["a", "b", "d"]
    assert names(label_selector="tier notin (web)") == ["b", "c"]
    assert names(label_selector="tier") == ["a", "b", "d"]
    assert names(label_selector="!tier") == ["c"]
    assert names(field_selector="metadata.namespace=other") == ["d"]
    assert names(field_selector="metadata.name!=a,metadata.namespace==demo") == ["b", "c"]
    assert sorted(s.metadata.name for s in core.list_namespaced_service("demo", label_selector="tier").items) == ["a", "b"]
    for bad in ({"label_selector": "tier in web"}, {"field_selector": "spec.ports=1"}):
        with pytest.raises(ApiException) as exc:
            core.list_service_for_all_namespaces(**bad)
        assert exc.value.status == 400


def test_pagination_is_a_consistent_snapshot(core: CoreV1Api) -> None:
    for i in range(25):
        core.create_namespaced_service("demo", svc(f"s{i:02d}"))
    first = core.list_namespaced_service("demo", limit=10)
    assert len(first.items) == 10 and first.metadata._continue and first.metadata.remaining_item_count == 15
    core.create_namespaced_service("demo", svc("zz-late"))  # not in the snapshot
    seen = [s.metadata.name for s in first.items]
    token = first.metadata._continue
    while token:
        page = core.list_namespaced_service("demo", limit=10, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        seen += [s.metadata.name for s in page.items]
        token = page.metadata._continue
    assert seen == [f"s{i:02d}" for i in range(25)]
    with pytest.raises(ApiException) as exc:
        core.list_namespaced_service("demo", limit=10, _continue="bm90LWEtdG9rZW4=")
    assert exc.value.status == 400


def test_list_resource_version_tracks_writes(core: CoreV1Api) -> None:
    before = int(core.list_namespaced_service("demo").metadata.resource_version)
    s = core.create_namespaced_service("demo", svc("web"))
    after = core.list_namespaced_service("demo").metadata.resource_version
    assert int(after) == int(s.metadata.resource_version) > before


# ---- other resources, discovery, plumbing ---------------------------------------------------------
def test_endpointslices_and_webhook_configurations(server: SandboxApiServer, core: CoreV1Api) -> None:
    disc = DiscoveryV1Api(server.api_client())
    eps = disc.create_namespaced_endpoint_slice("demo", {
        "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": True}}],
        "ports": [{"port": 8080, "name": "http"}],
    })
    assert eps.ports[0].protocol == "TCP"
    listed = disc.list_endpoint_slice_for_all_namespaces(label_selector="kubernetes.io/service-name=web")
    assert [e.metadata.name for e in listed.items] == ["web-abc"]
    with pytest.raises(ApiException) as exc:
        disc.patch_namespaced_endpoint_slice("web-abc", "demo", {"addressType": "IPv6"})
    assert exc.value.status == 422
    reg = AdmissionregistrationV1Api(server.api_client())
    with pytest.raises(ApiException) as exc:
        reg.create_mutating_webhook_configuration({"metadata": {"name": "x"}, "webhooks": [{
            "name": "bad.example.com", "sideEffects": "Some", "admissionReviewVersions": ["v1beta1"],
            "clientConfig": {"url": "http://plain.example.com/"},
        }]})
    message = error(exc)["message"]
    assert exc.value.status == 422
    assert "sideEffects" in message and "admissionReviewVersions" in message and "https" in message


def test_discovery_version_and_health(server: SandboxApiServer) -> None:
    client = server.api_client()
    assert kubernetes.client.VersionApi(client).get_code().major == "1"
    core_res = {r.name for r in CoreV1Api(client).get_api_resources().resources}
    assert {"namespaces", "services", "services/status"} <= core_res
    groups = {g.name for g in kubernetes.client.ApisApi(client).get_api_versions().groups}
    assert {"discovery.k8s.io", "admissionregistration.k8s.io"} <= groups
    assert DiscoveryV1Api(client).get_api_resources().resources[0].name == "endpointslices"
    assert httpx.get(f"{server.url}/healthz").text == "ok"
    bad = httpx.get(f"{server.url}/apis/apps/v1/deployments")
    assert bad.status_code == 404 and bad.json()["kind"] == "Status"


def test_bad_requests_are_400_not_500(server: SandboxApiServer, core: CoreV1Api) -> None:
    url = f"{server.url}/api/v1/namespaces/demo/services"
    for body in (b"{not json", b"[1, 2]", json.dumps({"kind": "Pod", "metadata": {"name": "x"}}).encode()):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["kind"] == "Status"
    core.create_namespaced_service("demo", svc("web"))
    r = httpx.patch(f"{url}/web", content=b"{}", headers={"Content-Type": "application/apply-patch+yaml"})
    assert r.status_code == 415
    r = httpx.get(url, params={"limit": "ten"})
    assert r.status_code == 400


def test_dry_run_stores_nothing(core: CoreV1Api) -> None:
    s = core.create_namespaced_service("demo", svc("web"), dry_run="All")
    assert s.spec.cluster_ip
    with pytest.raises(ApiException):
        core.read_namespaced_service("web", "demo")


def test_kubeconfig_and_restart_on_same_port(server: SandboxApiServer, core: CoreV1Api, tmp_path: Path) -> None:
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    client = kubernetes.config.new_client_from_config(config_file=str(path), context="sandbox")
    api = CoreV1Api(client)
    assert [n.metadata.name for n in api.list_namespace().items] == ["demo"]
    url = server.url
    server.stop()
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        CoreV1Api(server.api_client()).list_namespace(_request_timeout=2)
    server.start()
    assert server.url == url
    assert [n.metadata.name for n in api.list_namespace().items] == ["demo"]  # state survived


def test_table_output_for_kubectl(server: SandboxApiServer, core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("web", type="NodePort", selector={"app": "w"}))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    table = httpx.get(f"{server.url}/api/v1/services", headers={"Accept": accept}).json()
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
    (row,) = table["rows"]
    assert row["cells"][:3] == ["web", "NodePort", core.read_namespaced_service("web", "demo").spec.cluster_ip]
    assert row["object"]["metadata"]["namespace"] == "demo"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_real_kubectl_works_against_the_double(server: SandboxApiServer, core: CoreV1Api, tmp_path: Path) -> None:
    core.create_namespaced_service("demo", svc("web"))
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))

    def kubectl(*args: str) -> str:
        done = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "ClusterIP" in kubectl("get", "svc", "-n", "demo")
    kubectl("label", "svc", "-n", "demo", "web", "lightpath.cloud/proxy=enabled")
    assert core.read_namespaced_service("web", "demo").metadata.labels == {"lightpath.cloud/proxy": "enabled"}
    kubectl("delete", "svc", "-n", "demo", "web")
    assert core.list_namespaced_service("demo").items == []


def test_generate_name(core: CoreV1Api) -> None:
    made = core.create_namespaced_service("demo", {"metadata": {"generateName": "web-"}, "spec": {"ports": [{"port": 80}]}})
    assert made.metadata.name.startswith("web-") and len(made.metadata.name) == len("web-") + 5


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_serves_on_ipv6_loopback() -> None:
    with SandboxApiServer(host="::1") as srv:
        assert srv.url.startswith("http://[::1]:")
        api = CoreV1Api(srv.api_client())
        api.create_namespace({"metadata": {"name": "v6"}})
        assert [n.metadata.name for n in api.list_namespace().items] == ["v6"]
