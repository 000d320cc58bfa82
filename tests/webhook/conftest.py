"""A real webhook: uvicorn over TLS with a CA-signed serving pair in a kubelet-style Secret volume,
its namespace cache watching the sandbox apiserver, and a client that verifies like kube-apiserver."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from sandbox.api.apiserver import SandboxApiServer
from shared.tls import KeyPair, make_ca, make_serving_cert
from tests.support.secret_volume import SecretVolume
from webhook.app import create_app
from webhook.certs import CertStore
from webhook.namespaces import NamespaceCache
from webhook.server import RunningServer, serve_in_thread
from webhook.settings import Settings

SERVICE_NAME = "lightpath-webhook"
SERVICE_NAMESPACE = "lightpath-system"
HOSTNAME = f"{SERVICE_NAME}.{SERVICE_NAMESPACE}.svc"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@dataclass
class Webhook:
    ca: KeyPair
    pair: KeyPair
    volume: SecretVolume
    certs: CertStore
    namespaces: NamespaceCache
    server: RunningServer
    app: Any

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def client_context(self) -> ssl.SSLContext:
        """Verifies like kube-apiserver: only the caBundle, hostname <svc>.<ns>.svc."""
        return ssl.create_default_context(cadata=self.ca.cert_pem.decode())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.client_context(), timeout=10,
                            headers={"host": f"{HOSTNAME}:443"})

    def request(self, client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return client.request(method, path, extensions={"sni_hostname": HOSTNAME}, **kwargs)

    def tls_socket(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
        return self.client_context().wrap_socket(raw, server_hostname=HOSTNAME)

    def served_serial(self) -> int:
        """The serial a brand-new TLS connection is served."""
        with self.tls_socket() as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def metrics(self) -> str:
        with self.client() as client:
            return self.request(client, "GET", "/metrics").text

    def rotate(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.volume.write({"tls.crt": cert_pem, "tls.key": key_pem})


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return make_ca("lightpath-webhook-test-ca")


@pytest.fixture(scope="module")
def apiserver() -> Iterator[SandboxApiServer]:
    with SandboxApiServer(bookmark_interval=0.5) as api:
        yield api


def start_webhook(tmp_path: Path, ca: KeyPair, api: SandboxApiServer, settings: Settings | None = None) -> Webhook:
    pair = make_serving_cert(ca, [HOSTNAME])
    volume = SecretVolume(tmp_path / "webhook-tls")
    volume.write({"tls.crt": pair.cert_pem, "tls.key": pair.key_pem})
    certs = CertStore(volume.path("tls.crt"), volume.path("tls.key"), reload_interval=0.05)
    certs.load()
    namespaces = NamespaceCache(api.api_client(), watch_timeout=30, inactivity_timeout=10, max_backoff=1)
    namespaces.start()
    certs.start()
    app = create_app(settings or Settings(), namespaces, certs)
    server = serve_in_thread(app, certs)
    return Webhook(ca, pair, volume, certs, namespaces, server, app)


def stop_webhook(hook: Webhook) -> None:
    hook.server.stop()
    hook.certs.stop()
    hook.namespaces.stop()


@pytest.fixture
def webhook(tmp_path: Path, ca: KeyPair, apiserver: SandboxApiServer) -> Iterator[Webhook]:
    hook = start_webhook(tmp_path, ca, apiserver)
    try:
        assert hook.namespaces.wait_synced(10), "namespace cache never synced"
        yield hook
    finally:
        stop_webhook(hook)
