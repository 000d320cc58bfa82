"""List, then watch, the Services labelled for our proxy (the official ``kubernetes`` client for transport,
config and auth; the event stream is read here rather than through ``kubernetes.watch.Watch``).

Why not ``Watch.stream``: it deserializes every object into models (slow at 10,000 Services, and we want the
dicts the desired state is computed from), it does not always advance the resourceVersion on BOOKMARK
events, and with ``deserialize=False`` its ERROR handling breaks. The layers, as in kopf:

    run():   endless; re-lists when needed; exponential backoff with jitter after errors
    _list(): paged list -> sink.replace(services); its resourceVersion starts the watch
    _watch(): one watch request: bookmarks on, server timeout, client read timeout. The read timeout is a
             little longer than the server's bookmark period, so a stream that silently stalls raises
             instead of hanging forever; the watch is then restarted from the last resourceVersion.

The sink only records changes (``redirector.agent`` batches them into kernel transactions).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shared import constants as c

log = logging.getLogger(__name__)


class WatchSink(Protocol):
    """Where the watcher reports. Calls come from the watcher thread; implementations must be quick.
    ``replace`` gets an iterable that fetches the list's pages as it is consumed (and may raise)."""

    def replace(self, services: Iterable[dict[str, Any]]) -> None: ...
    def upsert(self, service: dict[str, Any]) -> None: ...
    def delete(self, service: dict[str, Any]) -> None: ...
    def restarted(self, reason: str) -> None: ...


class Gone(Exception):
    """410: our resourceVersion is too old for the server (history compacted): re-list."""


class EndedAtOnce(Exception):
    """The server (or a proxy in front of it) ended the watch early without a single event or bookmark: an
    error, backed off like one, or the agent would reconnect in a tight loop."""


class ServiceWatcher:
    """Keeps ``sink`` informed about Services labelled ``service-proxy-name=<proxy_name>``."""

    def __init__(
        self,
        api: client.CoreV1Api,
        sink: WatchSink,
        *,
        proxy_name: str = c.DEFAULT_PROXY_NAME,
        server_timeout: int = 300,
        read_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        page_size: int = 500,
        backoff_base: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        if server_timeout <= 0 or read_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("watch timeouts must be positive")
        self.api = api
        self.sink = sink
        self.selector = f"{c.SERVICE_PROXY_NAME_LABEL}={proxy_name}"
        self.server_timeout = server_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.page_size = page_size
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.resource_version: str | None = None  # last one seen, bookmarks included (debug endpoints)
        self.connected = False
        self.lists = 0  # completed lists (the first one unblocks the agent)
        self._stop = threading.Event()
        self._list_rv = ""
        self._response: Any = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop()``: list, watch, re-watch, re-list on 410, back off on errors."""
        rv: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                rv = self._watch(rv)
                failures = 0
                reason = "expired"  # the server closed the watch at its timeout: normal, resume at once
            except Gone:
                rv, reason = None, "gone"
                log.info("watch resourceVersion too old (410 Gone): re-listing")
            except Exception as exc:  # noqa: BLE001 - every failure leads to the same retry path
                if self._stop.is_set():
                    break
                failures += 1
                reason = "stalled" if _is_read_timeout(exc) else "error"
                delay = self._backoff(failures)
                log.warning("watch failed: retrying", extra={"reason": reason, "error": _describe(exc),
                                                               "retry_in_s": round(delay, 3), "failures": failures})
                self.sink.restarted(reason)
                self._stop.wait(delay)
                continue
            finally:
                self.connected = False
            if not self._stop.is_set():
                self.sink.restarted(reason)

    def stop(self) -> None:
        """Ask ``run`` to return; unblocks a read in progress by shutting the socket down."""
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)

    def _backoff(self, failures: int) -> float:
        """Exponential, with a random delay between half and all of it: many agents restarted by one apiserver
        outage do not stampede."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** min(failures - 1, 30)))
        return random.uniform(ceiling / 2, ceiling)

    # -- list -----------------------------------------------------------------------------------------

    def _list(self) -> str:
        """Hand the sink a generator over the pages: each page is fetched, projected and dropped in turn."""
        self._list_rv = ""
        self.sink.replace(self._pages())
        rv = self._list_rv
        self.lists += 1
        self.resource_version = rv
        log.info("listed labelled Services", extra={"resource_version": rv, "lists": self.lists})
        return rv

    def _pages(self) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": self.selector, "limit": self.page_size}
            if token:
                kwargs["_continue"] = token
            try:
                resp: Any = self.api.list_service_for_all_namespaces(
                    _preload_content=False, _request_timeout=(self.connect_timeout, max(self.read_timeout, 60)),
                    **kwargs)
            except ApiException as exc:
                if exc.status == 410:  # the continue token expired: start the list again
                    raise Gone() from exc
                raise
            try:
                page = json.loads(resp.data)
            finally:
                resp.release_conn()
            meta = page.get("metadata") or {}
            self._list_rv = self._list_rv or str(meta.get("resourceVersion") or "")
            items = page.get("items") or []
            del page
            yield from (item for item in items if isinstance(item, dict))
            token = meta.get("continue") or None
            if not token:
                return

    # -- watch ----------------------------------------------------------------------------------------

    def _watch(self, rv: str) -> str:
        try:
            resp: Any = self.api.list_service_for_all_namespaces(
                watch=True, label_selector=self.selector, resource_version=rv, allow_watch_bookmarks=True,
                timeout_seconds=self.server_timeout, _preload_content=False,
                _request_timeout=(self.connect_timeout, self.read_timeout))
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from exc
            raise
        with self._lock:
            self._response = resp
        if self._stop.is_set():
            _shutdown(resp)
        self.connected = True
        started, lines = time.monotonic(), 0
        try:
            if not 200 <= resp.status < 300:
                if resp.status == 410:
                    raise Gone()
                raise ApiException(status=resp.status, reason=resp.reason)
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                lines += 1
                rv = self._handle(line, rv)
        finally:
            with self._lock:
                self._response = None
            resp.release_conn()
        elapsed = time.monotonic() - started
        if not lines and not self._stop.is_set() and elapsed < self.server_timeout / 2:
            raise EndedAtOnce(f"the watch ended after {elapsed:.3f}s without any event "
                              f"(server timeout {self.server_timeout}s)")
        return rv

    def _handle(self, line: str, rv: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("unparsable watch line skipped", extra={"line": line[:200]})
            return rv
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            log.warning("watch event without an object skipped", extra={"type": kind})
            return rv
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise ApiException(status=code if isinstance(code, int) else 500, reason=str(obj.get("message")))
        if kind in ("ADDED", "MODIFIED"):
            self.sink.upsert(obj)
        elif kind == "DELETED":
            self.sink.delete(obj)
        elif kind != "BOOKMARK":
            log.warning("unknown watch event type skipped", extra={"type": kind})
        # Every event advances the resourceVersion, bookmarks included (read from the raw object).
        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
        if new_rv:
            rv = str(new_rv)
            self.resource_version = rv
        return rv


def _lines(resp: Any) -> Iterator[str]:
    """Split the chunked response into lines as bytes arrive (no buffering of whole chunks of events)."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            line, buffer = buffer[:cut], buffer[cut + 1:]
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")


def _shutdown(resp: Any) -> None:
    try:
        sock = getattr(getattr(resp, "connection", None), "sock", None) or getattr(resp, "_fp", None)
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        else:
            resp.close()
    except Exception:  # noqa: BLE001 - best effort: the read will end one way or another
        pass


def _is_read_timeout(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError | socket.timeout | TimeoutError):
            return True
        if "Read timed out" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]
