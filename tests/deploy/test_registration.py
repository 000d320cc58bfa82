"""The built MutatingWebhookConfiguration drives the real webhook through the sandbox apiserver.

Everything comes from the manifests, not a test copy: the self-signed overlay that `lightpath certs
generate` wrote is built with kubectl; its Namespace, MutatingWebhookConfiguration (caBundle,
namespaceSelector, failurePolicy, timeout) are loaded into the sandbox apiserver (a test double of
kube-apiserver, not a cluster); its Secret is mounted the way kubelet mounts it and served by the real
webhook configured from the Deployment's environment. Services created with the real kubernetes client
come back labelled exactly where the manifest and the policy say.
"""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.tls import make_ca
from tests.deploy.manifests import Obj, container, env_of, find, one
from tests.support.polling import wait_for
from tests.support.secret_volume import SecretVolume
from webhook.app import create_app
from webhook.certs import CertStore
from webhook.namespaces import NamespaceCache
from webhook.server import RunningServer, serve_in_thread
from webhook.settings import parse_settings

HANDOFF = c.SERVICE_PROXY_NAME_LABEL
ENABLED = {c.OPT_LABEL: c.OPT_ENABLED}


@dataclass
class Cluster:
    api: SandboxApiServer
    core: client.CoreV1Api
    admission: client.AdmissionregistrationV1Api
    namespaces: NamespaceCache
    mwc: Obj


@pytest.fixture
def cluster(self_signed_objs: list[Obj], tmp_path: Path) -> Iterator[Cluster]:
    deployment = one(self_signed_objs, "Deployment", "lightpath-webhook")
    ctr = container(deployment)
    secret = one(self_signed_objs, "Secret")
    mount = next(m for m in ctr["volumeMounts"] if m["name"] == "tls")
    # The Secret's keys as kubelet publishes them under the mount path.
    volume = SecretVolume(tmp_path / mount["mountPath"].lstrip("/"))
    volume.write({k: base64.b64decode(v) for k, v in secret["data"].items()})
    env = {**env_of(ctr)}
    for key in ("LIGHTPATH_TLS_CERT_FILE", "LIGHTPATH_TLS_KEY_FILE"):
        env[key] = str(tmp_path / env[key].lstrip("/"))
    settings = parse_settings([], environ=env)

    with SandboxApiServer(bookmark_interval=0.5) as api:
        core = client.CoreV1Api(api.api_client())
        admission = client.AdmissionregistrationV1Api(api.api_client())
        for ns in (*find(self_signed_objs, "Namespace"), {"metadata": {"name": "kube-system"}}):
            core.create_namespace(copy.deepcopy(ns))
        certs = CertStore(settings.tls_cert_file, settings.tls_key_file, reload_interval=0.05)
        certs.load()
        namespaces = NamespaceCache(api.api_client(), watch_timeout=30, inactivity_timeout=10, max_backoff=1)
        namespaces.start()
        server: RunningServer | None = None
        try:
            assert namespaces.wait_synced(10), "namespace cache never synced"
            server = serve_in_thread(create_app(settings, namespaces, certs), certs)
            mwc = one(self_signed_objs, "MutatingWebhookConfiguration")
            ref = mwc["webhooks"][0]["clientConfig"]["service"]
            api.route_service(ref["namespace"], ref["name"], server.port)
            admission.create_mutating_webhook_configuration(copy.deepcopy(mwc))
            yield Cluster(api, core, admission, namespaces, mwc)
        finally:
            if server is not None:
                server.stop()
            namespaces.stop()


def _namespace(cl: Cluster, labels: dict[str, str] | None = None) -> str:
    name = f"ns-{os.getpid()}-{len(cl.api.admission_log)}-{os.urandom(2).hex()}"
    cl.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    wait_for(lambda: cl.namespaces.labels(name) is not None, f"the webhook to see namespace {name}")
    return name


def _create(cl: Cluster, ns: str, name: str, ports: list[dict[str, Any]], labels: dict[str, str] | None = None) -> dict[str, Any]:
    body = {"metadata": {"name": name, "labels": labels or {}}, "spec": {"selector": {"app": name}, "ports": ports}}
    created = cl.core.create_namespaced_service(ns, body)
    return dict(cl.core.api_client.sanitize_for_serialization(created))


def _handoff(svc: dict[str, Any]) -> str | None:
    return (svc["metadata"].get("labels") or {}).get(HANDOFF)


def _calls(cl: Cluster, ns: str) -> list[dict[str, Any]]:
    return [e for e in cl.api.admission_log if e["namespace"] == ns]


TCP = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
UDP = [{"name": "dns", "port": 53, "protocol": "UDP"}]


def test_opted_in_namespace_tcp_service_is_labelled_over_verified_tls(cluster: Cluster) -> None:
    ns = _namespace(cluster, ENABLED)
    svc = _create(cluster, ns, "web", TCP)
    assert _handoff(svc) == c.DEFAULT_PROXY_NAME
    (call,) = _calls(cluster, ns)
    assert call["error"] is None and call["patched"] is True


def test_udp_service_stays_with_kube_proxy_with_a_warning(cluster: Cluster) -> None:
    ns = _namespace(cluster, ENABLED)
    svc = _create(cluster, ns, "dns", UDP)
    assert _handoff(svc) is None
    (call,) = _calls(cluster, ns)
    assert call["error"] is None and any("UDP" in w for w in call["warnings"])


def test_service_opt_in_in_a_plain_namespace(cluster: Cluster) -> None:
    ns = _namespace(cluster)
    assert _handoff(_create(cluster, ns, "web", TCP, ENABLED)) == c.DEFAULT_PROXY_NAME
    assert _handoff(_create(cluster, ns, "other", TCP)) is None, "global mode opt-in"


@pytest.mark.parametrize("where", ["kube-system", c.DEFAULT_NAMESPACE])
def test_excluded_namespaces_never_reach_the_webhook(cluster: Cluster, where: str) -> None:
    svc = _create(cluster, where, f"web-{os.urandom(2).hex()}", TCP, ENABLED)
    assert _handoff(svc) is None
    assert _calls(cluster, where) == []


def test_opted_out_namespace_keeps_the_webhook_away_from_ordinary_services(cluster: Cluster) -> None:
    ns = _namespace(cluster, {c.OPT_LABEL: c.OPT_DISABLED})
    assert _handoff(_create(cluster, ns, "web", TCP)) is None
    assert _calls(cluster, ns) == []


def test_service_opt_in_wins_in_an_opted_out_namespace(cluster: Cluster) -> None:
    """Policy rule 7 through the optin registration."""
    ns = _namespace(cluster, {c.OPT_LABEL: c.OPT_DISABLED})
    assert _handoff(_create(cluster, ns, "web", TCP, ENABLED)) == c.DEFAULT_PROXY_NAME
    assert [e["webhook"] for e in _calls(cluster, ns)] == ["optin.services.lightpath.cloud"]


def test_opting_a_namespace_out_hands_its_services_back_on_their_next_update(cluster: Cluster) -> None:
    """What `lightpath rollback --namespace-label` does: label the Namespace, touch each Service."""
    ns = _namespace(cluster, ENABLED)
    assert _handoff(_create(cluster, ns, "web", TCP)) == c.DEFAULT_PROXY_NAME
    cluster.core.patch_namespace(ns, {"metadata": {"labels": {c.OPT_LABEL: c.OPT_DISABLED}}})
    wait_for(lambda: (cluster.namespaces.labels(ns) or {}).get(c.OPT_LABEL) == c.OPT_DISABLED, "the webhook's cache")
    touched = cluster.core.patch_namespaced_service("web", ns, {"metadata": {"annotations": {"touched": "1"}}})
    assert (touched.metadata.labels or {}).get(HANDOFF) is None
    assert _calls(cluster, ns)[-1]["webhook"] == "handback.services.lightpath.cloud"


def test_update_is_admitted_too(cluster: Cluster) -> None:
    ns = _namespace(cluster)
    _create(cluster, ns, "web", TCP)
    patched = cluster.core.patch_namespaced_service("web", ns, {"metadata": {"labels": ENABLED}})
    # An UPDATE that makes it wanted marks it for the make-before-break handover (docs/migration.md).
    assert (patched.metadata.annotations or {}).get(c.HANDOVER_ANNOTATION) == c.HANDOVER_MIGRATE
    assert [e["operation"] for e in _calls(cluster, ns)] == ["CREATE", "UPDATE"]


def test_fail_open_when_the_ca_does_not_match(cluster: Cluster) -> None:
    """failurePolicy Ignore from the manifest: a webhook kube-apiserver cannot verify does not block
    Service writes; the Service is simply admitted unlabelled (kube-proxy keeps serving it)."""
    broken = copy.deepcopy(cluster.mwc)
    broken["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(make_ca("someone-else").cert_pem).decode()
    cluster.admission.replace_mutating_webhook_configuration(broken["metadata"]["name"], broken)
    ns = _namespace(cluster, ENABLED)
    svc = _create(cluster, ns, "web", TCP)
    assert _handoff(svc) is None
    (call,) = _calls(cluster, ns)
    assert call["allowed"] is True and call["error"] and "certificate" in call["error"].lower()
