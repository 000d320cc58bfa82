"""The HTTP shell around the pure core: read the body, look up namespace labels, answer, log, count.

``POST /mutate`` is served by a plain ASGI handler that the app dispatches to before FastAPI's
middleware stack and router: kube-apiserver calls it for every Service write, and the stack (error,
exception, body-limit and telemetry middleware, routing, Request objects) cost more CPU than the
whole decision (docs/performance.md). The other endpoints are ordinary FastAPI routes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Protocol

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from shared.errors import WebhookError
from shared.policy import PolicyConfig
from webhook.certs import CertStore
from webhook.metrics import Metrics
from webhook.review import Admission, InvalidReview, admit, allow_untouched, parse_review, skip_reason
from webhook.settings import Settings

MAX_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's own request limit; an AdmissionReview is far smaller
_INT_DIGITS = sys.get_int_max_str_digits()
log = logging.getLogger("lightpath.webhook")
_JSON = [(b"content-type", b"application/json")]


class NamespaceSource(Protocol):
    """What the handler needs from the namespace cache (webhook.namespaces.NamespaceCache)."""

    @property
    def synced(self) -> bool: ...

    def labels(self, name: str) -> dict[str, str] | None: ...

    def fetch(self, name: str) -> dict[str, str]: ...


class BadBody(WebhookError):
    """Answered with HTTP 400 and this message."""


class ClientGone(WebhookError):
    """The client disconnected before sending the whole body: nobody to answer."""


async def read_body(scope: Scope, receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them (declared or streamed)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise BadBody("invalid Content-Length")
            if int(value) > limit:
                raise BadBody(f"body of {int(value)} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadBody(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class MutateHandler:
    """ASGI handler of ``POST /mutate``."""

    def __init__(self, policy: PolicyConfig, namespaces: NamespaceSource, metrics: Metrics, *,
                 handover: bool = True) -> None:
        self.policy = policy
        self.handover = handover
        self.namespaces = namespaces
        self.metrics = metrics
        self.dumps = json.JSONEncoder(separators=(",", ":")).encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await _send(send, 405, b'{"detail":"Method Not Allowed"}', [*_JSON, (b"allow", b"POST")])
            return
        started = time.perf_counter()
        try:
            body = await read_body(scope, receive)
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadBody(f"body is not valid JSON: {exc}") from None
            except RecursionError:  # e.g. 100,000 "[": fits in 3 MiB, overflows the parser's stack
                raise BadBody("body is not valid JSON: nested too deeply") from None
            except ValueError:  # int("1" * 5000): Python's int-from-string limit, a plain ValueError
                raise BadBody(f"body is not valid JSON: a number has more than {_INT_DIGITS} digits") from None
            req = parse_review(doc)
        except ClientGone:
            return
        except (BadBody, InvalidReview) as exc:
            self.metrics.errors.labels("bad_request").inc()
            log.warning("bad admission request", extra={"error": str(exc), "status": 400})
            # Connection: close, so an unread remainder of an oversized body is never parsed as a request.
            await _send(send, 400, self.dumps({"detail": str(exc)}).encode(), [*_JSON, (b"connection", b"close")])
            return

        try:
            why_skip = skip_reason(req)
            if why_skip is None:
                labels = self.namespaces.labels(req.namespace)
                if labels is None:
                    try:
                        labels = await run_in_threadpool(self.namespaces.fetch, req.namespace)
                    except Exception:
                        self.metrics.errors.labels("namespace_lookup").inc()
                        raise
                result: Admission = admit(req, labels, self.policy, handover=self.handover)
            else:
                result = allow_untouched(req.uid, why_skip)
        except Exception as exc:
            self.metrics.errors.labels("internal").inc()
            log.exception("admission failed; allowing untouched", extra={"uid": req.uid})
            result = allow_untouched(req.uid, f"internal error: {type(exc).__name__}: {exc}", decision="error")

        await _send(send, 200, self.dumps(result.review).encode(), _JSON)
        duration = time.perf_counter() - started
        self.metrics.requests.labels(req.metric_operation, result.decision).inc()
        self.metrics.latency.observe(duration)
        if result.ops:
            self.metrics.patched.inc()
        log.info("admission", extra={"fields": {
            "uid": req.uid, "namespace": req.namespace, "name": req.name, "operation": req.operation,
            "dry_run": req.dry_run, "decision": result.decision, "reason": result.reason,
            "patched": bool(result.ops), "duration_ms": round(duration * 1000, 3),
        }})


class WebhookApp(FastAPI):
    """FastAPI, with ``/mutate`` dispatched to its handler ahead of the middleware stack."""

    mutate: MutateHandler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/mutate":
            await self.mutate(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _StateCollector(Collector):
    """Certificate and namespace-cache state, read at scrape time from the objects that own it."""

    def __init__(self, certs: CertStore, namespaces: NamespaceSource) -> None:
        self.certs = certs
        self.namespaces = namespaces

    def collect(self) -> Any:
        not_after = GaugeMetricFamily(
            "lightpath_webhook_certificate_not_after_timestamp_seconds",
            "Expiry (Unix time) of the serving certificate in use.",
        )
        if self.certs.loaded:
            not_after.add_metric([], self.certs.current.not_after.timestamp())
        yield not_after
        reloads = CounterMetricFamily(
            "lightpath_webhook_certificate_reloads",
            "Changed certificate pairs seen on disk, by result: success (swapped in) or failure (refused).",
            labels=["result"],
        )
        reloads.add_metric(["success"], self.certs.reload_successes)
        reloads.add_metric(["failure"], self.certs.reload_failures)
        yield reloads
        synced = GaugeMetricFamily("lightpath_webhook_namespace_cache_synced", "1 once the namespace list is loaded.")
        synced.add_metric([], 1.0 if self.namespaces.synced else 0.0)
        yield synced


def create_app(settings: Settings, namespace_cache: NamespaceSource, cert_store: CertStore) -> WebhookApp:
    """The webhook ASGI app. Owns its metrics registry, so tests may create several."""
    metrics = Metrics()
    metrics.registry.register(_StateCollector(cert_store, namespace_cache))
    app = WebhookApp(title="lightpath-webhook", docs_url=None, redoc_url=None, openapi_url=None)
    app.mutate = MutateHandler(settings.policy(), namespace_cache, metrics, handover=settings.handover)
    app.state.metrics = metrics

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        checks = {"certificate": cert_store.ready(), "namespace_cache": namespace_cache.synced}
        return JSONResponse(checks, status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
