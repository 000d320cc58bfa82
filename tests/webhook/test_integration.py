"""Through the sandbox apiserver with the real kubernetes client: the apiserver calls our webhook over
verified TLS (caBundle, <svc>.<ns>.svc) and stores what it answered. The label ends up present or
absent exactly as the policy says, and every stored Service is valid against the OpenAPI schema."""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from tests.support.polling import wait_for
from tests.webhook.conftest import SERVICE_NAME, SERVICE_NAMESPACE, Webhook

HANDOFF = c.SERVICE_PROXY_NAME_LABEL
_ids = itertools.count()


def webhook_configuration(ca_pem: bytes) -> dict[str, Any]:
    """What deploy/ installs, reduced to what matters here. failurePolicy Fail so a broken webhook
    shows up as a failed create instead of a silently unlabelled Service."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "lightpath"},
        "webhooks": [{
            "name": "services.lightpath.cloud",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "clientConfig": {
                "service": {"namespace": SERVICE_NAMESPACE, "name": SERVICE_NAME, "port": 443, "path": "/mutate"},
                "caBundle": base64.b64encode(ca_pem).decode(),
            },
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["services"], "scope": "Namespaced"}],
        }],
    }


@pytest.fixture
def core(webhook: Webhook, apiserver: SandboxApiServer) -> Iterator[client.CoreV1Api]:
    apiserver.route_service(SERVICE_NAMESPACE, SERVICE_NAME, webhook.server.port)
    api = apiserver.api_client()
    admission = client.AdmissionregistrationV1Api(api)
    admission.create_mutating_webhook_configuration(webhook_configuration(webhook.ca.cert_pem))
    try:
        yield client.CoreV1Api(api)
    finally:
        admission.delete_mutating_webhook_configuration("lightpath")


def new_namespace(core: client.CoreV1Api, webhook: Webhook, labels: dict[str, str] | None = None,
                  name: str | None = None) -> str:
    name = name or f"ns-{os.getpid()}-{next(_ids)}"
    core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    expected = {**(labels or {}), "kubernetes.io/metadata.name": name}  # the apiserver adds the name label
    wait_for(lambda: webhook.namespaces.labels(name) == expected, f"the webhook to see namespace {name}")
    return name


def set_namespace_opt(core: client.CoreV1Api, webhook: Webhook, name: str, value: str | None) -> None:
    core.patch_namespace(name, {"metadata": {"labels": {c.OPT_LABEL: value}}})
    wait_for(lambda: (webhook.namespaces.labels(name) or {}).get(c.OPT_LABEL) == value,
             f"the webhook to see the new labels of {name}")


def tcp_service(name: str, labels: dict[str, str] | None = None, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"selector": {"app": name}, "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}}


def stored(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    """The Service as the apiserver stored it, checked against the Kubernetes OpenAPI schema."""
    svc: dict[str, Any] = core.api_client.sanitize_for_serialization(core.read_namespaced_service(name, ns))
    svc.setdefault("apiVersion", "v1")
    svc.setdefault("kind", "Service")
    kubernetes_validate.validate(svc, kubernetes_validate.utils.latest_version(), strict=True)
    return svc


def label_of(svc: dict[str, Any]) -> str | None:
    return (svc["metadata"].get("labels") or {}).get(HANDOFF)


def reason_of(svc: dict[str, Any]) -> str | None:
    return (svc["metadata"].get("annotations") or {}).get(c.REASON_ANNOTATION)


def touch(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    """An unrelated update (what `kubectl annotate` does): the next UPDATE the webhook sees."""
    core.patch_namespaced_service(name, ns, {"metadata": {"annotations": {"touched": str(next(_ids))}}})
    return stored(core, ns, name)


def test_opted_in_namespace_gets_its_tcp_service_labelled(core: client.CoreV1Api, webhook: Webhook,
                                                          apiserver: SandboxApiServer) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    core.create_namespaced_service(ns, tcp_service("web"))
    svc = stored(core, ns, "web")
    assert label_of(svc) == c.DEFAULT_PROXY_NAME
    assert reason_of(svc) == "namespace opted in: TCP Service handled by lightpath.cloud"
    entry = [e for e in apiserver.admission_log if e["namespace"] == ns][-1]
    assert entry["patched"] and entry["warnings"] == [f"lightpath: Service web: {reason_of(svc)}"]


def test_plain_namespace_is_untouched_until_opt_in_then_migrates_on_next_update(
    core: client.CoreV1Api, webhook: Webhook
) -> None:
    ns = new_namespace(core, webhook)
    core.create_namespaced_service(ns, tcp_service("web"))
    svc = stored(core, ns, "web")
    assert label_of(svc) is None and reason_of(svc) is None  # global opt-in mode: not ours to touch

    set_namespace_opt(core, webhook, ns, c.OPT_ENABLED)
    assert label_of(stored(core, ns, "web")) is None  # nothing happens until the Service is written
    touched = touch(core, ns, "web")  # an UPDATE: it may carry traffic, so it is marked for a handover
    assert label_of(touched) is None and touched["metadata"]["annotations"][c.HANDOVER_ANNOTATION] == c.HANDOVER_MIGRATE

    set_namespace_opt(core, webhook, ns, c.OPT_DISABLED)
    svc = touch(core, ns, "web")
    assert label_of(svc) is None and reason_of(svc) == "namespace opted out: stays with kube-proxy"


def test_adding_a_udp_port_hands_the_service_back(core: client.CoreV1Api, webhook: Webhook) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    core.create_namespaced_service(ns, tcp_service("dns", ports=[{"name": "dns-tcp", "port": 53, "protocol": "TCP"}]))
    assert label_of(stored(core, ns, "dns")) == c.DEFAULT_PROXY_NAME

    svc = stored(core, ns, "dns")
    svc["spec"]["ports"].append({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53})
    core.replace_namespaced_service("dns", ns, svc)
    svc = stored(core, ns, "dns")
    assert label_of(svc) is None
    assert reason_of(svc) == "port dns/UDP 53 stays with kube-proxy (the label would move every port)"


def test_other_proxys_label_is_untouched(core: client.CoreV1Api, webhook: Webhook) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    core.create_namespaced_service(ns, tcp_service("mesh", labels={HANDOFF: "other-proxy"}))
    svc = touch(core, ns, "mesh")
    assert label_of(svc) == "other-proxy" and reason_of(svc) is None


def test_excluded_namespace_is_untouched(core: client.CoreV1Api, webhook: Webhook) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED}, name="kube-system")
    core.create_namespaced_service(ns, tcp_service("kube-dns-tcp"))
    svc = touch(core, ns, "kube-dns-tcp")
    assert label_of(svc) is None and reason_of(svc) is None
    core.delete_namespace(ns)


def test_service_label_wins_over_namespace(core: client.CoreV1Api, webhook: Webhook) -> None:
    enabled_ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    core.create_namespaced_service(enabled_ns, tcp_service("legacy", labels={c.OPT_LABEL: c.OPT_DISABLED}))
    assert label_of(stored(core, enabled_ns, "legacy")) is None

    plain_ns = new_namespace(core, webhook)
    core.create_namespaced_service(plain_ns, tcp_service("pilot", labels={c.OPT_LABEL: c.OPT_ENABLED}))
    assert label_of(stored(core, plain_ns, "pilot")) == c.DEFAULT_PROXY_NAME

    # Opting the Service out later hands it back on that very update.
    core.patch_namespaced_service("pilot", plain_ns, {"metadata": {"labels": {c.OPT_LABEL: c.OPT_DISABLED}}})
    svc = stored(core, plain_ns, "pilot")
    assert label_of(svc) is None and reason_of(svc) == "Service opted out: stays with kube-proxy"


def test_removing_our_label_by_hand_is_undone_while_opted_in(core: client.CoreV1Api, webhook: Webhook) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    core.create_namespaced_service(ns, tcp_service("web"))
    svc = stored(core, ns, "web")
    del svc["metadata"]["labels"][HANDOFF]
    core.replace_namespaced_service("web", ns, svc)
    # Still wanted: marked for a make-before-break handover back (the controller labels it once prepared).
    assert stored(core, ns, "web")["metadata"]["annotations"][c.HANDOVER_ANNOTATION] == c.HANDOVER_MIGRATE


def test_dry_run_is_answered_like_a_real_create(core: client.CoreV1Api, webhook: Webhook) -> None:
    ns = new_namespace(core, webhook, {c.OPT_LABEL: c.OPT_ENABLED})
    answer = core.create_namespaced_service(ns, tcp_service("web"), dry_run="All")
    assert answer.metadata.labels[HANDOFF] == c.DEFAULT_PROXY_NAME
    with pytest.raises(client.ApiException) as exc:
        core.read_namespaced_service("web", ns)
    assert exc.value.status == 404


def test_namespace_not_yet_in_the_cache_is_fetched(core: client.CoreV1Api, webhook: Webhook,
                                                   apiserver: SandboxApiServer) -> None:
    apiserver.stall_watches(True)  # the webhook's watch hears nothing from now on
    try:
        ns = f"late-{os.getpid()}-{next(_ids)}"
        core.create_namespace({"metadata": {"name": ns, "labels": {c.OPT_LABEL: c.OPT_ENABLED}}})
        assert webhook.namespaces.labels(ns) is None
        core.create_namespaced_service(ns, tcp_service("web"))
        assert label_of(stored(core, ns, "web")) == c.DEFAULT_PROXY_NAME
    finally:
        apiserver.stall_watches(False)
