"""Mutating admission in SandboxApiServer: a real TLS webhook, called as kube-apiserver calls it."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException, CoreV1Api

from sandbox.api.apiserver import SandboxApiServer
from shared.tls import KeyPair, make_ca, make_serving_cert

HOOK_NS, HOOK_SVC = "lightpath-system", "lightpath"
HOOK_DNS = f"{HOOK_SVC}.{HOOK_NS}.svc"
LABEL = "service.kubernetes.io/service-proxy-name"

Behaviour = Callable[[dict[str, Any]], dict[str, Any]]


def label_patch(review: dict[str, Any]) -> dict[str, Any]:
    """Allow, add our label, warn."""
    obj = review["request"]["object"]
    ops: list[dict[str, Any]] = []
    if not obj["metadata"].get("labels"):
        ops.append({"op": "add", "path": "/metadata/labels", "value": {}})
    ops.append({"op": "add", "path": "/metadata/labels/" + LABEL.replace("/", "~1"), "value": "lightpath.cloud"})
    return {
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(json.dumps(ops).encode()).decode(),
        "warnings": ["lightpath: labelled for the node proxy"],
    }


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the API server hanging up on a slow webhook is part of the tests


class Webhook:
    """A trivial mutating webhook over TLS; records every AdmissionReview it receives."""

    def __init__(self, pair: KeyPair, tmp: Path, behaviour: Behaviour = label_patch) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.hosts: list[str] = []
        self.behaviour = behaviour
        self.release = threading.Event()
        self.release.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.reviews.append(review)
                hook.paths.append(self.path)
                hook.hosts.append(self.headers["Host"])
                hook.release.wait(10)
                response = {"uid": review["request"]["uid"], **hook.behaviour(review)}
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": response}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        (tmp / "tls.crt").write_bytes(pair.cert_pem)
        (tmp / "tls.key").write_bytes(pair.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return make_ca("sandbox-test-ca")


@pytest.fixture
def webhook(ca: KeyPair, tmp_path: Path) -> Iterator[Webhook]:
    hook = Webhook(make_serving_cert(ca, [HOOK_DNS, "127.0.0.1"]), tmp_path)
    yield hook
    hook.stop()


@pytest.fixture
def core(server: SandboxApiServer) -> CoreV1Api:
    api = CoreV1Api(server.api_client())
    api.create_namespace({"metadata": {"name": "demo"}})
    api.create_namespace({"metadata": {"name": HOOK_NS}})
    return api


def configure(
    server: SandboxApiServer,
    ca: KeyPair,
    *,
    failure_policy: str = "Fail",
    timeout: int = 10,
    client_config: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    hook: dict[str, Any] = {
        "name": "lightpath.lightpath.cloud",
        "clientConfig": client_config or {
            "service": {"namespace": HOOK_NS, "name": HOOK_SVC, "path": "/mutate", "port": 443},
            "caBundle": base64.b64encode(ca.cert_pem).decode(),
        },
        "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["services"], "scope": "Namespaced"}],
        "failurePolicy": failure_policy,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": timeout,
        "namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [HOOK_NS, "kube-system"]},
        ]},
        **extra,
    }
    body = {"metadata": {"name": "lightpath"}, "webhooks": [hook]}
    from kubernetes.client import AdmissionregistrationV1Api

    AdmissionregistrationV1Api(server.api_client()).create_mutating_webhook_configuration(body)


def svc(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"ports": [{"port": 80}]}}


def test_patch_applied_warnings_surfaced_and_review_is_real(
    server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair
) -> None:
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca)
    created, status, headers = core.create_namespaced_service_with_http_info("demo", svc("web"))
    assert status == 201
    assert created.metadata.labels == {LABEL: "lightpath.cloud"}
    assert created.spec.cluster_ip  # allocation still happens (after admission)
    assert headers["Warning"] == '299 - "lightpath: labelled for the node proxy"'
    (review,) = webhook.reviews
    req = review["request"]
    assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    assert req["kind"] == {"group": "", "version": "v1", "kind": "Service"}
    assert req["resource"] == {"group": "", "version": "v1", "resource": "services"}
    assert (req["operation"], req["namespace"], req["name"], req["dryRun"]) == ("CREATE", "demo", "web", False)
    assert req["oldObject"] is None and req["options"]["kind"] == "CreateOptions"
    assert req["userInfo"]["username"]
    obj = req["object"]
    assert obj["spec"]["type"] == "ClusterIP" and obj["spec"]["ports"][0]["protocol"] == "TCP"  # defaulted first
    assert "clusterIP" not in obj["spec"]  # ...but not yet allocated, as on a real cluster
    assert webhook.paths == ["/mutate?timeout=10s"] and webhook.hosts == [f"{HOOK_DNS}:443"]
    (entry,) = server.admission_log
    assert entry["uid"] == req["uid"] and entry["allowed"] and entry["patched"] and entry["error"] is None
    assert entry["operation"] == "CREATE" and entry["warnings"] == ["lightpath: labelled for the node proxy"]


def test_update_sends_old_object(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair) -> None:
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    core.create_namespaced_service("demo", svc("web"))
    configure(server, ca)
    updated = core.patch_namespaced_service("web", "demo", {"metadata": {"annotations": {"a": "b"}}})
    assert updated.metadata.labels == {LABEL: "lightpath.cloud"}
    (review,) = webhook.reviews
    req = review["request"]
    assert req["operation"] == "UPDATE" and req["options"]["kind"] == "UpdateOptions"
    assert req["oldObject"]["metadata"].get("labels") in (None, {})
    assert req["object"]["metadata"]["annotations"] == {"a": "b"}


def test_namespace_and_object_selectors(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair) -> None:
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca, objectSelector={"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]})
    own = core.create_namespaced_service(HOOK_NS, svc("own"))  # namespace excluded by namespaceSelector
    skipped = core.create_namespaced_service("demo", svc("skipped", skip="yes"))  # excluded by objectSelector
    assert not own.metadata.labels and skipped.metadata.labels == {"skip": "yes"}
    assert webhook.reviews == []
    core.create_namespaced_service("demo", svc("taken"))
    assert [r["request"]["name"] for r in webhook.reviews] == ["taken"]


def test_rules_select_resources_and_subresources(
    server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair
) -> None:
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    core.create_namespaced_service("demo", svc("lb"))
    configure(server, ca)
    core.create_namespace({"metadata": {"name": "not-a-service"}})
    core.patch_namespaced_service_status("lb", "demo", {"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}})
    assert webhook.reviews == []  # "services" matches neither namespaces nor services/status


def test_denied_request_is_rejected_with_the_webhook_message(
    server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair
) -> None:
    webhook.behaviour = lambda review: {"allowed": False, "status": {"code": 403, "message": "no thanks"}}
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca)
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("web"))
    assert exc.value.status == 403
    assert 'admission webhook "lightpath.lightpath.cloud" denied the request: no thanks' in json.loads(exc.value.body)["message"]
    assert core.list_namespaced_service("demo").items == []


@pytest.mark.parametrize("policy", ["Ignore", "Fail"])
def test_webhook_down(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair, policy: str) -> None:
    port = webhook.port
    webhook.stop()  # nothing listens there any more
    server.route_service(HOOK_NS, HOOK_SVC, port)
    configure(server, ca, failure_policy=policy)
    if policy == "Ignore":
        created = core.create_namespaced_service("demo", svc("web"))
        assert not created.metadata.labels
    else:
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_service("demo", svc("web"))
        body = json.loads(exc.value.body)
        assert exc.value.status == 500 and body["reason"] == "InternalError"
        assert 'failed calling webhook "lightpath.lightpath.cloud"' in body["message"]
    (entry,) = server.admission_log
    assert entry["error"] and entry["allowed"] == (policy == "Ignore")


@pytest.mark.parametrize("policy", ["Ignore", "Fail"])
def test_wrong_ca_fails_tls(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, policy: str) -> None:
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, make_ca("some-other-ca"), failure_policy=policy)
    if policy == "Ignore":
        assert not core.create_namespaced_service("demo", svc("web")).metadata.labels
    else:
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_service("demo", svc("web"))
        assert exc.value.status == 500
        assert "certificate verify failed" in json.loads(exc.value.body)["message"]
    assert webhook.reviews == []
    assert "certificate verify failed" in server.admission_log[0]["error"]


def test_hostname_mismatch_is_rejected(server: SandboxApiServer, core: CoreV1Api, ca: KeyPair, tmp_path: Path) -> None:
    wrong = Webhook(make_serving_cert(ca, ["someone-else.lightpath-system.svc"]), tmp_path)
    try:
        server.route_service(HOOK_NS, HOOK_SVC, wrong.port)
        configure(server, ca)
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_service("demo", svc("web"))
        assert exc.value.status == 500 and "match" in json.loads(exc.value.body)["message"]
        assert wrong.reviews == []
    finally:
        wrong.stop()


def test_timeout_honoured(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair) -> None:
    webhook.release.clear()  # the webhook hangs until released
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca, failure_policy="Ignore", timeout=1)
    try:
        assert not core.create_namespaced_service("demo", svc("web")).metadata.labels
    finally:
        webhook.release.set()
    assert "timed out" in server.admission_log[0]["error"]


def test_url_client_config_and_dry_run(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair) -> None:
    configure(server, ca, client_config={
        "url": f"https://127.0.0.1:{webhook.port}/mutate",
        "caBundle": base64.b64encode(ca.cert_pem).decode(),
    })
    dry = core.create_namespaced_service("demo", svc("web"), dry_run="All")
    assert dry.metadata.labels == {LABEL: "lightpath.cloud"}
    assert webhook.reviews[0]["request"]["dryRun"] is True
    assert core.list_namespaced_service("demo").items == []


def test_unroutable_service_reference_obeys_failure_policy(server: SandboxApiServer, core: CoreV1Api, ca: KeyPair) -> None:
    configure(server, ca, failure_policy="Fail")
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("web"))
    assert exc.value.status == 500 and "route_service" in json.loads(exc.value.body)["message"]


def test_bad_patch_from_webhook_is_an_internal_error(
    server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair
) -> None:
    bad = [{"op": "remove", "path": "/metadata/nothing-here"}]
    webhook.behaviour = lambda review: {"allowed": True, "patchType": "JSONPatch",
                                        "patch": base64.b64encode(json.dumps(bad).encode()).decode()}
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca, failure_policy="Ignore")
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("web"))
    assert exc.value.status == 500


def test_patch_that_breaks_validation_is_422(server: SandboxApiServer, core: CoreV1Api, webhook: Webhook, ca: KeyPair) -> None:
    ops = [{"op": "add", "path": "/metadata/labels", "value": {"bad": "no spaces allowed"}}]
    webhook.behaviour = lambda review: {"allowed": True, "patchType": "JSONPatch",
                                        "patch": base64.b64encode(json.dumps(ops).encode()).decode()}
    server.route_service(HOOK_NS, HOOK_SVC, webhook.port)
    configure(server, ca)
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("demo", svc("web"))
    assert exc.value.status == 422
