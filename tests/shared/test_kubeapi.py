"""shared.kubeapi against the sandbox API test double (real HTTP, the unmodified kubernetes ApiClient), and
the paths it builds."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sandbox.api.apiserver import SandboxApiServer
from shared import kube
from shared.kubeapi import DAEMON_SETS, ENDPOINT_SLICES, LEASES, NODES, SERVICES, Api, Kind


@pytest.fixture
def server() -> Iterator[SandboxApiServer]:
    with SandboxApiServer(bookmark_interval=0.1) as api:
        client.CoreV1Api(api.api_client()).create_namespace({"metadata": {"name": "shop"}})
        yield api


def test_paths_of_every_kind_the_agent_uses() -> None:
    assert SERVICES.path() == "/api/v1/services"
    assert SERVICES.path("shop", "web") == "/api/v1/namespaces/shop/services/web"
    assert NODES.path(name="n1") == "/api/v1/nodes/n1"
    assert ENDPOINT_SLICES.path() == "/apis/discovery.k8s.io/v1/endpointslices"
    assert DAEMON_SETS.path("lightpath-system") == "/apis/apps/v1/namespaces/lightpath-system/daemonsets"
    assert LEASES.path("ns", "a/b") == "/apis/coordination.k8s.io/v1/namespaces/ns/leases/a%2Fb"  # never a path escape
    with pytest.raises(ValueError, match="not namespaced"):
        NODES.path("shop")


def test_create_patch_and_list_round_trip(server: SandboxApiServer) -> None:
    api = Api(server.api_client())
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "agent-n1"},
             "spec": {"holderIdentity": "n1"}}
    created = api.create(LEASES, "shop", lease, timeout=5)
    assert created["metadata"]["name"] == "agent-n1" and created["metadata"]["resourceVersion"]
    patched = api.patch(LEASES, "shop", "agent-n1", {"metadata": {"annotations": {"x": "1"}}}, timeout=5)
    assert patched["metadata"]["annotations"] == {"x": "1"} and patched["spec"]["holderIdentity"] == "n1"
    listed = api.read_list(LEASES, "shop")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["agent-n1"]


def test_the_pager_and_selectors_go_through_the_lister(server: SandboxApiServer) -> None:
    core = client.CoreV1Api(server.api_client())
    for i in range(5):
        core.create_namespaced_service("shop", {"metadata": {"name": f"s{i}", "labels": {"tier": "a" if i % 2 else "b"}},
                                                "spec": {"ports": [{"port": 80}]}})
    api = Api(server.api_client())
    pages = list(kube.pages(api.lister(SERVICES), page_size=2, label_selector="tier=b"))
    assert len(pages) == 2  # 3 Services of tier b in pages of 2
    assert sorted(i["metadata"]["name"] for p in pages for i in p["items"]) == ["s0", "s2", "s4"]
    one = api.read_list(SERVICES, "shop", field_selector="metadata.name=s3")
    assert [i["metadata"]["name"] for i in one["items"]] == ["s3"]


def test_a_watch_streams_raw_lines(server: SandboxApiServer) -> None:
    api = Api(server.api_client())
    rv = api.read_list(SERVICES)["metadata"]["resourceVersion"]
    resp = api.read_list(SERVICES, watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=5,
                         _preload_content=False, _request_timeout=(3, 10))
    try:
        client.CoreV1Api(server.api_client()).create_namespaced_service(
            "shop", {"metadata": {"name": "late"}, "spec": {"ports": [{"port": 80}]}})
        for line in kube.split_lines(resp.stream(4096)):
            event = json.loads(line)
            if event["type"] == "ADDED":
                assert event["object"]["metadata"]["name"] == "late"
                break
        else:
            pytest.fail("the watch ended without the ADDED event")
    finally:
        resp.release_conn()


def test_errors_are_the_clients_api_exception(server: SandboxApiServer) -> None:
    api = Api(server.api_client())
    with pytest.raises(ApiException) as err:
        api.patch(LEASES, "shop", "missing", {"metadata": {}}, timeout=5)
    assert err.value.status == 404
    with pytest.raises(ApiException) as err:
        api.read_list(Kind("v1", "nosuchthings"), _preload_content=False)  # raised before any body is streamed
    assert err.value.status == 404


def test_an_unknown_list_parameter_is_a_programming_error_never_sent(server: SandboxApiServer) -> None:
    with pytest.raises(TypeError, match="unknown list parameter 'labels'"):
        Api(server.api_client()).read_list(SERVICES, labels="a=b")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                          "type": self.headers.get("Content-Type"), "body": json.loads(body)})
        data = b'{"kind":"Lease"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_requests_carry_the_clients_credentials_and_the_patch_type() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{httpd.server_address[1]}"
        cfg.api_key = {"authorization": "Bearer t0ken"}  # what load_incluster_config sets
        assert Api(client.ApiClient(cfg)).patch(LEASES, "ns", "l", {"a": 1}, timeout=5) == {"kind": "Lease"}
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Recorder.seen == [{"path": "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l", "auth": "Bearer t0ken",
                               "type": "application/merge-patch+json", "body": {"a": 1}}]


def test_the_long_running_components_never_load_the_generated_api_classes() -> None:
    """The point of the module: building the agent's watches, lease and owner watch, and the webhook's namespace
    cache, leader election, handover controller and event recorder touches none of the generated API modules."""
    import subprocess

    code = ("import sys; from kubernetes import client; from shared.kubeapi import Api; "
            "from redirector import node, watch, lease, owner; "
            "api = Api(client.ApiClient()); watch.ServiceWatcher(api, None); watch.EndpointSliceWatcher(api, None); "
            "watch.NodeWatcher(api, None, 'n'); owner.owner_watch(api, 'ns', 'ds', owner.OwnerState('ds')); "
            "lease.LeaseReporter(api, 'ns', 'n', list); "
            "from webhook import namespaces, leader, handover; from shared.policy import PolicyConfig; "
            "raw = client.ApiClient(); namespaces.NamespaceCache(raw); leader.LeaderElector(raw, 'ns', 'l', 'me'); "
            "handover.HandoverController(raw, PolicyConfig(), lambda ns: None); handover.event_recorder(raw, 'me'); "
            "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
