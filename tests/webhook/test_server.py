"""The real server over real TLS: verification like kube-apiserver, health, metrics, logs, and
certificate rotation under load (kubelet symlink swap, in-flight request, broken pair refused)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from sandbox.api.apiserver import SandboxApiServer
from shared import constants as c
from shared.logs import JsonFormatter
from shared.tls import KeyPair, make_serving_cert
from tests.support.polling import wait_for
from tests.webhook.conftest import HOSTNAME, Webhook, metric, start_webhook, stop_webhook
from webhook.server import serve_in_thread


def review(uid: str = "uid-1", namespace: str = "default", opt: str | None = c.OPT_ENABLED) -> dict[str, Any]:
    labels = {c.OPT_LABEL: opt} if opt else {}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Service"}, "operation": "CREATE",
        "namespace": namespace, "name": "web",
        "object": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace,
                   "labels": labels}, "spec": {"ports": [{"name": "http", "port": 80}]}}}}


def http_request(doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc).encode()
    head = f"POST /mutate HTTP/1.1\r\nHost: {HOSTNAME}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def read_response(tls: ssl.SSLSocket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += tls.recv(65536)
    return int(head.split()[1]), json.loads(body)


def patch_ops(resp: dict[str, Any]) -> list[dict[str, Any]]:
    r = resp["response"]
    return json.loads(base64.b64decode(r["patch"])) if "patch" in r else []


def test_served_certificate_verifies_for_the_service_hostname_only(webhook: Webhook) -> None:
    assert webhook.served_serial() == webhook.pair.serial
    raw_ctx = webhook.client_context()
    import socket

    with socket.create_connection(("127.0.0.1", webhook.server.port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        raw_ctx.wrap_socket(raw, server_hostname="evil.example.com")


def test_mutate_health_ready_and_metrics(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lightpath.webhook")
    with webhook.client() as client:
        r = webhook.request(client, "POST", "/mutate", json=review(uid="abc-123"))
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["response"]["uid"] == "abc-123" and body["response"]["allowed"] is True
        assert patch_ops(body)[0] == {"op": "add", "path": "/metadata/labels/service.kubernetes.io~1service-proxy-name",
                                      "value": c.DEFAULT_PROXY_NAME}

        assert webhook.request(client, "GET", "/healthz").status_code == 200
        ready = webhook.request(client, "GET", "/readyz")
        assert ready.status_code == 200 and ready.json() == {"certificate": True, "namespace_cache": True}

        text = webhook.request(client, "GET", "/metrics").text
    assert metric(text, "lightpath_webhook_admission_requests_total", operation="CREATE", decision="label") == 1
    assert metric(text, "lightpath_webhook_admission_duration_seconds_count") == 1
    assert metric(text, "lightpath_webhook_patches_total") == 1
    assert metric(text, "lightpath_webhook_certificate_not_after_timestamp_seconds") == \
        webhook.pair.certificate.not_valid_after_utc.timestamp()
    assert metric(text, "lightpath_webhook_certificate_reloads_total", result="success") == 0
    assert metric(text, "lightpath_webhook_errors_total", kind="internal") == 0
    assert metric(text, "lightpath_webhook_namespace_cache_synced") == 1

    lines = [r for r in caplog.records if r.getMessage() == "admission"]
    assert len(lines) == 1
    logged = json.loads(JsonFormatter().format(lines[0]))
    assert logged["msg"] == "admission" and logged["level"] == "INFO"
    assert {k: logged[k] for k in ("uid", "namespace", "name", "operation", "decision")} == {
        "uid": "abc-123", "namespace": "default", "name": "web", "operation": "CREATE", "decision": "label"}
    assert logged["reason"].startswith("Service opted in") and logged["duration_ms"] >= 0


def test_two_apps_have_separate_registries(tmp_path: Path, ca: KeyPair, apiserver: SandboxApiServer,
                                           webhook: Webhook) -> None:
    other = start_webhook(tmp_path / "other", ca, apiserver)
    try:
        assert other.app.state.metrics.registry is not webhook.app.state.metrics.registry
    finally:
        stop_webhook(other)


def test_rotation_reaches_new_connections_without_disturbing_one_in_flight(webhook: Webhook, ca: KeyPair) -> None:
    old_serial = webhook.pair.serial
    new = make_serving_cert(ca, [HOSTNAME])
    with webhook.tls_socket() as inflight:
        # A request whose body is only half sent when the files are swapped.
        request = http_request(review(uid="in-flight"))
        inflight.sendall(request[: len(request) // 2])

        webhook.rotate(new.cert_pem, new.key_pem)
        wait_for(lambda: webhook.served_serial() == new.serial, "a new connection to see the new serial")

        inflight.sendall(request[len(request) // 2:])
        status, body = read_response(inflight)
        assert status == 200 and body["response"]["uid"] == "in-flight" and patch_ops(body)
        # The connection negotiated with the old certificate stays usable (keep-alive).
        inflight.sendall(http_request(review(uid="after-swap")))
        status, body = read_response(inflight)
        assert status == 200 and body["response"]["uid"] == "after-swap"
        der = inflight.getpeercert(binary_form=True)
    assert der is not None and old_serial != new.serial
    assert webhook.certs.reload_successes == 1
    assert metric(webhook.metrics(), "lightpath_webhook_certificate_reloads_total", result="success") == 1


def test_broken_pair_is_refused_and_the_old_one_keeps_serving(webhook: Webhook, ca: KeyPair) -> None:
    a, b = make_serving_cert(ca, [HOSTNAME]), make_serving_cert(ca, [HOSTNAME])
    webhook.rotate(a.cert_pem, b.key_pem)  # a certificate with somebody else's key
    wait_for(lambda: webhook.certs.reload_failures == 1, "the broken pair to be refused")
    assert webhook.served_serial() == webhook.pair.serial
    with webhook.client() as client:
        r = webhook.request(client, "POST", "/mutate", json=review(uid="still-serving"))
        assert r.status_code == 200 and r.json()["response"]["uid"] == "still-serving"
        text = webhook.request(client, "GET", "/metrics").text
        assert metric(text, "lightpath_webhook_certificate_reloads_total", result="failure") == 1
        assert webhook.request(client, "GET", "/readyz").status_code == 200
    webhook.rotate(a.cert_pem, a.key_pem)  # fixed by the issuer
    wait_for(lambda: webhook.served_serial() == a.serial, "the fixed pair to be served")


def test_without_a_namespace_cache_ready_fails_and_admission_is_allowed_untouched(
    tmp_path: Path, ca: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    # An apiserver that went away: the cache never syncs and the GET fallback fails.
    api = SandboxApiServer()
    api.start()
    api.stop()
    hook = start_webhook(tmp_path, ca, api)
    try:
        with hook.client() as client:
            ready = hook.request(client, "GET", "/readyz")
            assert ready.status_code == 503 and ready.json() == {"certificate": True, "namespace_cache": False}
            r = hook.request(client, "POST", "/mutate", json=review(uid="no-cache", namespace="shop"))
            assert r.status_code == 200
            resp = r.json()["response"]
            assert resp == {"uid": "no-cache", "allowed": True, "auditAnnotations": resp["auditAnnotations"]}
            assert resp["auditAnnotations"]["decision"] == "error"
            text = hook.request(client, "GET", "/metrics").text
        assert metric(text, "lightpath_webhook_errors_total", kind="namespace_lookup") == 1
        assert metric(text, "lightpath_webhook_errors_total", kind="internal") == 1
        assert metric(text, "lightpath_webhook_admission_requests_total", operation="CREATE", decision="error") == 1
        assert metric(text, "lightpath_webhook_namespace_cache_synced") == 0
    finally:
        stop_webhook(hook)


def _closed_by_server(tls: ssl.SSLSocket) -> bool:
    """Read until the server closes the connection (True), or until the socket's own timeout (False)."""
    try:
        while tls.recv(65536):
            pass
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def test_a_request_head_that_does_not_arrive_gets_the_connection_closed(webhook: Webhook) -> None:
    """Issue 17 item 6: a client that completed the TLS handshake and sent nothing, or half a header, was
    still connected after 80 s (uvicorn's keep-alive timer only starts after a response)."""
    strict = serve_in_thread(webhook.app, webhook.certs, head_timeout=0.3)

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", strict.port), timeout=20)  # far past the 0.3 s deadline
        return webhook.client_context().wrap_socket(raw, server_hostname=HOSTNAME)

    try:
        with connect() as silent:
            assert _closed_by_server(silent), "a connection that never sent a byte stayed open"
        with connect() as half:
            half.sendall(b"POST /mutate HTTP/1.1\r\nHost: " + HOSTNAME.encode() + b"\r\nContent-Ty")
            assert _closed_by_server(half), "a connection with half a header stayed open"
        with connect() as reused:
            reused.sendall(http_request(review(uid="in-time")))  # a whole request is served as before
            status, body = read_response(reused)
            assert status == 200 and body["response"]["uid"] == "in-time"
            reused.sendall(b"POST /mutate HTTP/1.1\r\nHo")  # then the next head stalls on the kept-alive connection
            assert _closed_by_server(reused), "a kept-alive connection with half a header stayed open"
        with connect() as stalled_body:  # a whole head announcing 100 bytes, then one byte of them
            stalled_body.sendall(b"POST /mutate HTTP/1.1\r\nHost: " + HOSTNAME.encode()
                                 + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            assert _closed_by_server(stalled_body), "a connection whose body never came stayed open"
    finally:
        strict.stop()
