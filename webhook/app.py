"""The HTTP shell around the pure core: read the body, look up namespace labels, answer, log, count.

``/mutate`` is a plain Starlette route on purpose: it takes the raw request and returns raw bytes, so
the hot path pays for neither FastAPI's dependency solving nor pydantic (see docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from webhook.certs import CertStore
from webhook.metrics import Metrics
from webhook.review import Admission, InvalidReview, admit, allow_untouched, parse_review, skip_reason
from webhook.settings import Settings

MAX_BODY_BYTES = 3 * 1024 * 1024  # kube-apiserver's own request limit; an AdmissionReview is far smaller
log = logging.getLogger("lightpath.webhook")


class NamespaceSource(Protocol):
    """What the handler needs from the namespace cache (webhook.namespaces.NamespaceCache)."""

    @property
    def synced(self) -> bool: ...

    def labels(self, name: str) -> dict[str, str] | None: ...

    def fetch(self, name: str) -> dict[str, str]: ...


class BadRequest(Exception):
    """Answered with HTTP 400 and this message."""


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise BadRequest(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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


def create_app(settings: Settings, namespace_cache: NamespaceSource, cert_store: CertStore) -> FastAPI:
    """The webhook ASGI app. Owns its metrics registry, so tests may create several."""
    policy = settings.policy()
    metrics = Metrics()
    metrics.registry.register(_StateCollector(cert_store, namespace_cache))
    dumps = json.JSONEncoder(separators=(",", ":")).encode

    async def mutate(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = await read_body(request)
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadRequest(f"body is not valid JSON: {exc}") from None
            req = parse_review(doc)
        except (BadRequest, InvalidReview) as exc:
            metrics.errors.labels("bad_request").inc()
            log.warning("bad admission request", extra={"error": str(exc), "status": 400})
            return JSONResponse({"detail": str(exc)}, status_code=400, headers={"connection": "close"})

        try:
            why_skip = skip_reason(req)
            if why_skip is None:
                labels = namespace_cache.labels(req.namespace)
                if labels is None:
                    try:
                        labels = await run_in_threadpool(namespace_cache.fetch, req.namespace)
                    except Exception:
                        metrics.errors.labels("namespace_lookup").inc()
                        raise
                result: Admission = admit(req, labels, policy)
            else:
                result = allow_untouched(req.uid, why_skip)
        except Exception as exc:
            metrics.errors.labels("internal").inc()
            log.exception("admission failed; allowing untouched", extra={"uid": req.uid})
            result = allow_untouched(req.uid, f"internal error: {type(exc).__name__}: {exc}", decision="error")

        duration = time.perf_counter() - started
        metrics.requests.labels(req.metric_operation, result.decision).inc()
        metrics.latency.observe(duration)
        if result.ops:
            metrics.patched.inc()
        log.info(
            "admission",
            extra={"fields": {
                "uid": req.uid,
                "namespace": req.namespace,
                "name": req.name,
                "operation": req.operation,
                "dry_run": req.dry_run,
                "decision": result.decision,
                "reason": result.reason,
                "patched": bool(result.ops),
                "duration_ms": round(duration * 1000, 3),
            }},
        )
        return Response(dumps(result.review), media_type="application/json")

    app = FastAPI(title="lightpath-webhook", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.routes.append(Route("/mutate", mutate, methods=["POST"]))

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

    app.state.metrics = metrics
    return app
