"""The redirector's HTTP apps (FastAPI): the health app and the read-only debug app, thin shells around
``views`` / ``lookup``.

Every handler reads (the agent through ``DebugSource``, the kernel through the backend, netlink through
``NetlinkProbe``), then calls a pure function. Nothing here changes state: GET only, no body, validated
query parameters (400 with the reason), bounded answers. Kernel reads are serialised (one at a time): a
burst of debug requests must not keep the sync loop waiting on the backend's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from redirector.debug.lookup import lookup, parse_query
from redirector.debug.netlink import NetlinkError, NetlinkProbe
from redirector.debug.pages import MAX_LIMIT, BadRequest, check_limit
from redirector.debug.settings import DebugSettings, config_view
from redirector.debug.source import DebugSource
from redirector.debug.text import render
from redirector.debug.views import diff_view, health_view, ready_view, rules_view, services_view
from redirector.model import Backend, Key
from shared.errors import RedirectorError

log = logging.getLogger("lightpath.redirector.debug")

Format = Literal["json", "text"]
KERNEL_WAIT = 10.0  # seconds a request waits for its turn to read the kernel before a 503


class Unavailable(RedirectorError):
    """The kernel or netlink could not be read: answered with 503 and this message."""


FormatQ = Annotated[Format | None, Query(description="json (default) or text (an aligned table); "
                                                    "Accept: text/plain works too")]
LimitQ = Annotated[int | None, Query(ge=1, le=MAX_LIMIT, description=f"page size (default 500, max {MAX_LIMIT})")]
ContinueQ = Annotated[str | None, Query(alias="continue", max_length=2048, description="token of the previous page")]
ServiceQ = Annotated[str | None, Query(max_length=300, description="only this Service (namespace/name)")]
IpQ = Annotated[str, Query(max_length=100, description="IPv4 or IPv6 address")]
PortQ = Annotated[int, Query(ge=1, le=65535, description="TCP port")]
ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "invalid query parameter or a request body"}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": "the kernel or netlink could not be read"}}


def create_health_app(
    source: DebugSource,
    settings: DebugSettings,
    *,
    probe: NetlinkProbe | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The always-on health app: ``/healthz``, ``/readyz``, ``/metrics`` and nothing else (what the kubelet
    probes and Prometheus scrapes, like kube-proxy's 10256), so turning the debug server off never fails a probe."""
    app = _base_app("lightpath redirector health")
    add_health_routes(app, source, settings, probe or NetlinkProbe(settings.netns), clock)
    _drop_422(app)
    return app


def create_debug_app(
    source: DebugSource,
    backend: Backend,
    settings: DebugSettings,
    *,
    probe: NetlinkProbe | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The debug ASGI app for one agent: ``/debug/*`` plus the health routes (the ``debug`` client asks one
    port for everything). Several may coexist (tests): no global state."""
    netlink = probe or NetlinkProbe(settings.netns)
    gate = threading.Semaphore(1)
    app = _base_app("lightpath redirector debug")
    add_health_routes(app, source, settings, netlink, clock)

    @contextmanager
    def kernel_turn() -> Iterator[None]:
        if not gate.acquire(timeout=KERNEL_WAIT):
            raise Unavailable("another debug request is reading the kernel: try again")
        try:
            yield
        finally:
            gate.release()

    def kernel_keys() -> frozenset[Key]:
        with kernel_turn():
            try:
                return backend.read()
            except Exception as exc:  # noqa: BLE001 - any backend failure is "cannot read the kernel"
                raise Unavailable(f"reading the kernel ({backend.name}) failed: {exc}") from exc

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable) -> Response:
        log.warning("debug endpoint unavailable", extra={"error": str(exc)})
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.get("/debug/services", summary="the desired state, per labelled Service (paged)")
    def services(request: Request, limit: LimitQ = None, continue_: ContinueQ = None,
                 format: FormatQ = None) -> Response:
        body = services_view(source.desired(), limit=limit, token=continue_)
        return answer(request, "services", body, format)

    @app.get("/debug/rules", summary="what the kernel holds now, read back (paged)", responses=UNAVAILABLE)
    def rules(request: Request, limit: LimitQ = None, continue_: ContinueQ = None,
              format: FormatQ = None) -> Response:
        check_limit(limit)
        keys = kernel_keys()
        with kernel_turn():
            try:
                description = dict(backend.describe())
            except Exception as exc:  # noqa: BLE001
                raise Unavailable(f"describing the kernel objects ({backend.name}) failed: {exc}") from exc
        body = rules_view(keys, description, source.desired(), limit=limit, token=continue_)
        return answer(request, "rules", body, format)

    @app.get("/debug/diff", summary="desired vs kernel: missing and extra entries", responses=UNAVAILABLE)
    def diff(request: Request, limit: LimitQ = None, format: FormatQ = None) -> Response:
        size = check_limit(limit)
        desired = source.desired()
        body = diff_view(desired, kernel_keys(), limit=size)
        return answer(request, "diff", body, format)

    @app.get("/debug/lookup", summary="would TCP from a pod to ip:port be redirected on this node?",
             responses=UNAVAILABLE)
    def lookup_endpoint(request: Request, ip: IpQ, port: PortQ,
                        format: FormatQ = None) -> Response:
        query = parse_query(ip, port)
        keys = kernel_keys()
        try:
            prefixes = netlink.local_prefixes()
        except NetlinkError as exc:
            raise Unavailable(str(exc)) from exc
        desired = source.desired()
        common: dict[str, Any] = {"kernel": keys, "desired": desired, "local_prefixes": prefixes,
                                  "proxy_port": settings.proxy_port, "proxy_name": settings.proxy_name}
        body = lookup(query, **common)
        if not body["redirected"] and not body["in_desired_state"]:
            try:
                listed = source.list_services()
            except Exception as exc:  # noqa: BLE001 - the API may be down: answer with what we know
                listed = None
                body["api_error"] = f"listing Services failed: {type(exc).__name__}: {str(exc)[:200]}"
            if listed is not None:
                body = lookup(query, **common, services=listed)
        return answer(request, "lookup", body, format)

    @app.get("/debug/proxy", summary="what the node's Envoy holds per Service: ACKed versions, refusals, endpoints",
             responses={404: {"description": "this agent runs without a control plane"}})
    def proxy(request: Request, limit: LimitQ = None, service: ServiceQ = None, format: FormatQ = None) -> Response:
        size = check_limit(limit) or 200
        body = source.proxy_report(size, service)
        if body is None:
            return JSONResponse({"detail": "this agent runs without a control plane (--xds-socket none)"},
                                status_code=404)
        return answer(request, "proxy", body, format)

    @app.get("/debug/config", summary="the effective settings (no secrets)")
    def config(request: Request, format: FormatQ = None) -> Response:
        body = config_view(settings)
        body["backend"] = backend.name
        return answer(request, "config", body, format)

    _drop_422(app)
    return app


def _base_app(title: str) -> FastAPI:
    """A FastAPI app that refuses bodies and answers invalid parameters with 400 and one line."""
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None, responses=ERRORS)
    app.add_middleware(NoBody)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": validation_message(exc)}, status_code=400)

    return app


def add_health_routes(app: FastAPI, source: DebugSource, settings: DebugSettings, netlink: NetlinkProbe,
                      clock: Callable[[], float]) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics``, on the health app and the debug app alike."""

    @app.get("/healthz", summary="200 while syncing is healthy, else 503 with the age", responses={503: {}})
    def healthz(request: Request, format: FormatQ = None) -> Response:
        status, body = health_view(source.sync_facts(), clock(), settings.health_timeout)
        return answer(request, "healthz", body, format, status)

    @app.get("/readyz", summary="200 after the first sync while the proxy port listens", responses={503: {}})
    def readyz(request: Request, format: FormatQ = None) -> Response:
        listeners, error = None, None
        try:
            listeners = netlink.listeners(settings.proxy_port)
        except NetlinkError as exc:
            error = str(exc)
        status, body = ready_view(source.sync_facts(), settings.proxy_port, listeners, error)
        return answer(request, "readyz", body, format, status)

    @app.get("/metrics", summary="Prometheus metrics of the agent", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(source.registry), media_type=CONTENT_TYPE_LATEST)


def answer(request: Request, endpoint: str, body: dict[str, Any], fmt: Format | None, status: int = 200) -> Response:
    """JSON, or the aligned table when asked for text (``format`` or Accept)."""
    headers = {"cache-control": "no-store"}
    if wants_text(fmt, request.headers.get("accept")):
        return PlainTextResponse(render(endpoint, body), status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


def _drop_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route; we answer 400 instead (see ``_base_app``)."""
    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def wants_text(fmt: str | None, accept: str | None) -> bool:
    """``format`` wins; else text when the Accept header weighs text/plain above application/json."""
    if fmt is not None:
        return fmt == "text"
    weights: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[media.lower()] = max(q, weights.get(media.lower(), 0.0))
    text = max(weights.get("text/plain", 0.0), weights.get("text/*", 0.0))
    return text > weights.get("application/json", 0.0)


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: "query parameter 'port': Input should be ..."."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = f"{loc[0]} parameter {loc[-1]!r}" if len(loc) >= 2 else ".".join(loc) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class NoBody:
    """Refuse a request that carries a body (400): no endpoint reads one, so a body is a mistake or a probe."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"0", b"")):
                response = JSONResponse({"detail": "no request body is accepted: every endpoint is a GET"},
                                        status_code=400, headers={"connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
