"""The CLI against the sandbox API server (a test double) with the REAL webhook registered over TLS.

The webhook is the production app (webhook.app.create_app + uvicorn over TLS, namespace cache watching
the sandbox); the sandbox calls it through a MutatingWebhookConfiguration whose caBundle is our test CA,
verifying the certificate for lightpath-webhook.lightpath-system.svc like kube-apiserver does.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from cli.main import main
from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.tls import KeyPair, make_ca, make_serving_cert
from webhook.app import create_app
from webhook.certs import CertStore
from webhook.namespaces import NamespaceCache
from webhook.server import RunningServer, serve_in_thread
from webhook.settings import Settings

WEBHOOK_SERVICE = "lightpath-webhook"
WEBHOOK_NAMESPACE = c.DEFAULT_NAMESPACE
HOSTNAME = f"{WEBHOOK_SERVICE}.{WEBHOOK_NAMESPACE}.svc"


@dataclass
class Result:
    code: int
    out: str
    err: str


def webhook_configuration(ca: KeyPair, failure_policy: str = "Ignore") -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "lightpath"},
        "webhooks": [
            {
                "name": "services.lightpath.cloud",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": failure_policy,
                "timeoutSeconds": 5,
                "clientConfig": {
                    "service": {
                        "namespace": WEBHOOK_NAMESPACE,
                        "name": WEBHOOK_SERVICE,
                        "path": "/mutate",
                        "port": 443,
                    },
                    "caBundle": base64.b64encode(ca.cert_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["services"],
                        "scope": "Namespaced",
                    }
                ],
            }
        ],
    }


@dataclass
class Cluster:
    """One sandbox API server, the webhook serving it, and helpers to drive the CLI against both."""

    api: SandboxApiServer
    kubeconfig: Path
    tmp: Path
    settings: Settings
    core: client.CoreV1Api = field(init=False)
    server: RunningServer | None = None
    namespaces: NamespaceCache | None = None

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api.api_client())

    # -- webhook ---------------------------------------------------------------------------------
    def start_webhook(self) -> None:
        certs = CertStore(self.settings.tls_cert_file, self.settings.tls_key_file)
        certs.load()
        self.namespaces = NamespaceCache(self.api.api_client())
        self.namespaces.start()
        assert self.namespaces.wait_synced(10), "webhook namespace cache did not sync"
        self.server = serve_in_thread(create_app(self.settings, self.namespaces, certs), certs)
        self.api.route_service(WEBHOOK_NAMESPACE, WEBHOOK_SERVICE, self.server.port)

    def stop_webhook(self) -> None:
        """Make the webhook unavailable: the sandbox's calls fail and failurePolicy Ignore admits unchanged."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.namespaces is not None:
            self.namespaces.stop()
            self.namespaces = None

    # -- objects ---------------------------------------------------------------------------------
    def create(self, namespaces: list[dict[str, Any]], services: list[dict[str, Any]]) -> None:
        for ns in namespaces:
            self.core.create_namespace(ns)
        for svc in services:
            self.core.create_namespaced_service(svc["metadata"]["namespace"], svc)

    def labels(self, namespace: str, name: str) -> dict[str, str]:
        svc = self.core.read_namespaced_service(name, namespace)
        return dict(svc.metadata.labels or {})

    def handoff(self, namespace: str, name: str) -> str | None:
        return self.labels(namespace, name).get(c.SERVICE_PROXY_NAME_LABEL)

    def resource_versions(self) -> dict[str, str]:
        """Every Service's resourceVersion: proves a command wrote nothing when it must not."""
        items = self.core.list_service_for_all_namespaces().items
        return {f"{s.metadata.namespace}/{s.metadata.name}": s.metadata.resource_version for s in items}

    # -- the CLI ---------------------------------------------------------------------------------
    def run(self, *argv: str) -> Result:
        """`lightpath --kubeconfig … ARGV` through the real main(argv), capturing stdout and stderr."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--kubeconfig", str(self.kubeconfig), *argv])
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyPair, Path, Path]:
    ca = make_ca("lightpath-test-ca")
    pair = make_serving_cert(ca, [HOSTNAME])
    folder = tmp_path_factory.mktemp("webhook-tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return ca, cert, key


@pytest.fixture
def cluster(tmp_path: Path, pki: tuple[KeyPair, Path, Path]) -> Iterator[Cluster]:
    """Sandbox API server + registered, running webhook (default policy config)."""
    ca, cert, key = pki
    with SandboxApiServer() as api:
        settings = Settings(tls_cert_file=cert, tls_key_file=key, bind_address="127.0.0.1", port=0)
        env = Cluster(api, api.write_kubeconfig(tmp_path / "kubeconfig"), tmp_path, settings)
        env.core.create_namespace({"metadata": {"name": WEBHOOK_NAMESPACE}})
        client.AdmissionregistrationV1Api(api.api_client()).create_mutating_webhook_configuration(
            webhook_configuration(ca)
        )
        env.start_webhook()
        try:
            yield env
        finally:
            env.stop_webhook()
