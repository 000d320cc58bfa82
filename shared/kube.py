"""The project's one list-watch reflector and its one pager, over the official ``kubernetes`` client.

Every watcher in lightpath (the node agent's Services and EndpointSlices, the webhook's Namespaces) is a
``Reflector``; every paged list (the CLI, the debug lookup, the reflector's own list) is ``pages``. The
layers follow kopf (``_cogs/clients/watching.py``) and client-go's reflector:

    Reflector.run()   endless: list when needed, watch, re-watch from the last resourceVersion after a
                      broken or silent stream, re-list on 410 Gone, jittered exponential backoff on errors
    Reflector._list() paged list -> ``sink.replace(items)``; the list's resourceVersion starts the watch
    Reflector._watch() one watch request: bookmarks on, a server timeout, and a client read timeout that
                      the socket re-arms on every byte received (so it is an inactivity timeout, longer
                      than the server's ~60 s bookmark period): a stalled stream raises instead of hanging
    split_lines()     the chunked body -> lines, scanning each buffer once (offsets, no re-slicing)

WHY raw JSON (``_preload_content=False``) rather than ``kubernetes.watch.Watch``: the client's models cost
tens of µs per object (seconds at 10,000 Services) where every consumer wants the dicts; ``Watch`` does not
always advance the resourceVersion on BOOKMARK events, and its ERROR handling breaks with
``deserialize=False``. The sink is called from the reflector's thread and must be quick.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import urllib3
from kubernetes.client.exceptions import ApiException

from shared.errors import SharedError

log = logging.getLogger(__name__)

PAGE_SIZE = 500


class KubeError(SharedError):
    """Base of the errors this module raises."""


class Gone(KubeError):
    """410: the resourceVersion (or a list's continue token) is too old for the server: list again."""


class EndedAtOnce(KubeError):
    """The server (or a proxy in front of it) ended a watch early without one event or bookmark: treated as
    an error and backed off, or a reflector would reconnect in a tight loop."""


class WatchSink(Protocol):
    """Where a reflector reports. ``replace`` gets an iterable that fetches the list's pages as it is consumed
    (and may raise half-way: then nothing of it must be published)."""

    def replace(self, items: Iterable[dict[str, Any]]) -> None: ...
    def upsert(self, obj: dict[str, Any]) -> None: ...
    def delete(self, obj: dict[str, Any]) -> None: ...
    def restarted(self, reason: str) -> None: ...


ListFn = Callable[..., Any]  # a list call: shared.kubeapi.Api.lister(kind), or a generated client list method
Call = Callable[[Callable[[], Any]], Any]


def _direct(fn: Callable[[], Any]) -> Any:
    return fn()


def pages(
    list_fn: ListFn,
    *,
    page_size: int = PAGE_SIZE,
    request_timeout: float | tuple[float, float] | None = None,
    call: Call = _direct,
    max_pages: int | None = None,
    **params: Any,
) -> Iterator[dict[str, Any]]:
    """Every page of one list (``limit`` + ``continue``) as the server's JSON dict, fetched as consumed.

    ``call`` wraps each request (the CLI retries conflicts and words errors there); a 410 on a continue
    token raises ``Gone``. ``max_pages`` stops early (a bounded debug lookup); the caller can tell from
    the last page's ``metadata.continue``.
    """
    token: str | None = None
    fetched = 0
    while True:
        kwargs: dict[str, Any] = {**params, "limit": page_size, "_preload_content": False}
        if request_timeout is not None:
            kwargs["_request_timeout"] = request_timeout
        if token:
            kwargs["_continue"] = token

        def one(kwargs: dict[str, Any] = kwargs) -> Any:
            try:
                return list_fn(**kwargs)
            except ApiException as exc:
                if exc.status == 410:
                    raise Gone(f"list continue token expired: {exc.reason}") from exc
                raise

        resp = call(one)
        try:
            page = json.loads(resp.data)
        finally:
            release = getattr(resp, "release_conn", None)
            if release is not None:
                release()
        if not isinstance(page, dict):
            raise KubeError(f"unexpected list answer from the API server: {str(page)[:200]}")
        yield page
        fetched += 1
        token = (page.get("metadata") or {}).get("continue") or None
        if not token or (max_pages is not None and fetched >= max_pages):
            return


def list_items(list_fn: ListFn, **kwargs: Any) -> list[dict[str, Any]]:
    """All items of a paged list, as dicts."""
    return [item for page in pages(list_fn, **kwargs) for item in page.get("items") or [] if isinstance(item, dict)]


class Reflector:
    """Keeps ``sink`` informed about one kind of object, from one list call, until ``stop()``."""

    def __init__(
        self,
        list_fn: ListFn,
        sink: WatchSink,
        *,
        what: str = "objects",
        label_selector: str | None = None,
        field_selector: str | None = None,
        server_timeout: int = 300,
        read_timeout: float = 90.0,
        connect_timeout: float = 10.0,
        page_size: int = PAGE_SIZE,
        backoff_base: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        if server_timeout <= 0 or read_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("watch timeouts must be positive")
        if backoff_base <= 0 or backoff_max < backoff_base:
            raise ValueError("backoff must satisfy 0 < backoff_base <= backoff_max")
        self.list_fn = list_fn
        self.sink = sink
        self.what = what
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.server_timeout = server_timeout
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.page_size = page_size
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.resource_version: str | None = None  # last one seen, bookmarks included (debug endpoints)
        self.connected = False
        self.lists = 0  # completed lists
        self.relists = 0  # lists forced by 410 Gone
        self.restarts = 0  # watches given up after an error or a stall
        self._stop = threading.Event()
        self._list_rv = ""
        self._response: Any = None
        self._lock = threading.Lock()

    def _selector(self) -> dict[str, Any]:
        selectors = {"label_selector": self.label_selector, "field_selector": self.field_selector}
        return {k: v for k, v in selectors.items() if v}

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
                self.relists += 1
                log.info("watch resourceVersion too old (410 Gone): re-listing", extra={"what": self.what})
            except Exception as exc:  # noqa: BLE001 - every failure leads to the same retry path
                if self._stop.is_set():
                    break
                failures += 1
                self.restarts += 1
                reason = "stalled" if is_read_timeout(exc) else "error"
                if rv is not None and self.resource_version:
                    rv = self.resource_version  # resume after the last event seen, not where that watch began
                delay = self.backoff(failures)
                log.warning("watch failed: retrying", extra={"what": self.what, "reason": reason,
                                                               "error": describe(exc), "retry_in_s": round(delay, 3),
                                                               "failures": failures})
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

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def backoff(self, failures: int) -> float:
        """Exponential, with a random delay between half and all of it: many clients restarted by one
        apiserver outage do not stampede."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** min(failures - 1, 30)))
        return random.uniform(ceiling / 2, ceiling)

    # -- list -----------------------------------------------------------------------------------------

    def _list(self) -> str:
        """Hand the sink a generator over the pages: each page is fetched, used and dropped in turn."""
        self._list_rv = ""
        self.sink.replace(self._items())
        rv = self._list_rv
        self.lists += 1
        self.resource_version = rv
        log.info("listed", extra={"what": self.what, "resource_version": rv, "lists": self.lists})
        return rv

    def _items(self) -> Iterator[dict[str, Any]]:
        timeout = (self.connect_timeout, max(self.read_timeout, 60))
        for page in pages(self.list_fn, page_size=self.page_size, request_timeout=timeout, **self._selector()):
            self._list_rv = self._list_rv or str((page.get("metadata") or {}).get("resourceVersion") or "")
            items = page.get("items") or []
            del page
            yield from (item for item in items if isinstance(item, dict))

    # -- watch ----------------------------------------------------------------------------------------

    def _watch(self, rv: str) -> str:
        try:
            resp: Any = self.list_fn(
                watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=self.server_timeout,
                _preload_content=False, _request_timeout=(self.connect_timeout, self.read_timeout),
                **self._selector())
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
            for line in split_lines(resp.stream(amt=None, decode_content=False)):
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

    def _handle(self, line: bytes | str, rv: str) -> str:
        try:
            event = json.loads(line)
        except ValueError:
            shown = line[:200] if isinstance(line, str) else line[:200].decode(errors="replace")
            log.warning("unparsable watch line skipped", extra={"what": self.what, "line": shown})
            return rv
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            log.warning("watch event without an object skipped", extra={"what": self.what, "type": kind})
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
            log.warning("unknown watch event type skipped", extra={"what": self.what, "type": kind})
        # Every event advances the resourceVersion, bookmarks included (read from the raw object).
        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
        if new_rv:
            rv = str(new_rv)
            self.resource_version = rv
        return rv


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Newline-delimited records as bytes arrive. Each chunk is scanned once with an offset; only the
    unfinished tail is kept between chunks (re-slicing the buffer per line made a 4 MiB chunk quadratic)."""
    tail = b""
    for chunk in chunks:
        if not chunk:
            continue
        buffer = tail + chunk if tail else chunk
        start = 0
        while True:
            cut = buffer.find(b"\n", start)
            if cut < 0:
                break
            if cut > start and not buffer[start:cut].isspace():
                yield buffer[start:cut]
            start = cut + 1
        tail = buffer[start:]
    if tail.strip():
        yield tail


def _shutdown(resp: Any) -> None:
    try:
        sock = getattr(getattr(resp, "connection", None), "sock", None) or getattr(resp, "_fp", None)
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        else:
            resp.close()
    except Exception:  # noqa: BLE001 - best effort: the read will end one way or another
        pass


def is_read_timeout(exc: BaseException | None) -> bool:
    """A read that timed out, by type: urllib3's ReadTimeoutError, or a socket timeout anywhere in the
    cause chain (urllib3 wraps some in ProtocolError, whose args carry the original exception)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, urllib3.exceptions.ReadTimeoutError | socket.timeout | TimeoutError):
            return True
        if isinstance(exc, urllib3.exceptions.ProtocolError) and any(
                isinstance(arg, socket.timeout | TimeoutError | urllib3.exceptions.ReadTimeoutError)
                for arg in exc.args):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"[:300]


class FanOut:
    """One watch feeding several sinks (the node agent's Services feed the kernel tracker and the control
    plane). A list is read once and handed to each sink in turn, in the order given."""

    def __init__(self, *sinks: WatchSink) -> None:
        self.sinks = sinks

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        listed = list(items)  # consumed once; raising half-way publishes nothing to anyone
        for sink in self.sinks:
            sink.replace(listed)

    def upsert(self, obj: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.upsert(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.delete(obj)

    def restarted(self, reason: str) -> None:
        for sink in self.sinks:
            sink.restarted(reason)
