"""Namespace labels for the policy: a watched cache, and a GET for a namespace not seen yet.

The watch loop follows kopf's layering: an endless loop that reconnects with backoff -> list (paged)
then watch from the list's resourceVersion -> one watch request with bookmarks and a server-side
timeout. A broken stream is watched again from the last resourceVersion (client-go's reflector does
the same); a 410 Gone (history compacted) goes back to a fresh list. A client-side read timeout longer
than the bookmark interval catches a stream that silently stalls.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger("lightpath.webhook.namespaces")


class _Gone(Exception):
    """The watch's resourceVersion is too old: re-list."""


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


class NamespaceCache:
    """Labels of every Namespace, kept current by a background watch thread."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        watch_timeout: int = 300,
        inactivity_timeout: float = 120.0,
        lookup_timeout: float = 2.0,
        page_size: int = 500,
        max_backoff: float = 30.0,
    ) -> None:
        self._api = client.CoreV1Api(api_client)
        self.watch_timeout = watch_timeout
        self.inactivity_timeout = inactivity_timeout
        self.lookup_timeout = lookup_timeout
        self.page_size = page_size
        self.max_backoff = max_backoff
        self._labels: dict[str, dict[str, str]] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None
        self.restarts = 0
        self.relists = 0

    # -- reads (event loop thread) -----------------------------------------------------------
    @property
    def synced(self) -> bool:
        """True once a full list has been loaded (it stays true across re-lists: data is only stale)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def labels(self, name: str) -> dict[str, str] | None:
        """Cached labels, or None when the namespace has not been seen (call ``fetch``)."""
        return self._labels.get(name)

    def fetch(self, name: str) -> dict[str, str]:
        """GET one namespace (blocking). A missing namespace has no labels (the apiserver rejects
        the Service anyway). The result only fills a gap: the watch stays the source of truth."""
        try:
            resp: Any = self._api.read_namespace(name, _preload_content=False, _request_timeout=self.lookup_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        labels = _labels(json.loads(resp.data))
        self._labels.setdefault(name, labels)
        return labels

    # -- the watch thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="namespace-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            try:
                resp.shutdown()  # unblock a read in progress
            except Exception:
                resp.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        """Like client-go's reflector: after a broken or silent stream, watch again from the last
        resourceVersion seen (cheap, nothing missed); list again only on 410 or a failed list."""
        backoff = 0.5
        rv: str | None = None
        while not self._stop.is_set():
            events = 0
            try:
                if rv is None:
                    rv = self._list()
                for seen in self._watch(rv):
                    rv = seen
                    events += 1
                if events:
                    backoff = 0.5
                    continue
                self._stop.wait(backoff)  # a stream that ends at once, empty: do not spin
                backoff = min(backoff * 2, self.max_backoff)
            except _Gone:
                self.relists += 1
                rv = None
                log.info("namespace watch expired (410 Gone); re-listing")
            except Exception as exc:
                if self._stop.is_set():
                    return
                self.restarts += 1
                log.warning("namespace watch failed; retrying", extra={"error": repr(exc), "backoff_s": backoff})
                if events:
                    backoff = 0.5
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _list(self) -> str:
        """A full paged list replaces the cache; returns the resourceVersion to watch from."""
        fresh: dict[str, dict[str, str]] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False, "_request_timeout": (10, 60)}
            if token:
                kwargs["_continue"] = token
            try:
                resp: Any = self._api.list_namespace(**kwargs)
            except ApiException as exc:
                if exc.status == 410:
                    raise _Gone() from None  # continue token expired
                raise
            page = json.loads(resp.data)
            for item in page.get("items") or []:
                fresh[item["metadata"]["name"]] = _labels(item)
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                self._labels = fresh
                self._synced.set()
                log.info("namespace cache synced", extra={"namespaces": len(fresh)})
                return str(meta.get("resourceVersion") or "")

    def _watch(self, rv: str) -> Iterator[str]:
        """One watch request until the server ends it; yields the resourceVersion after each event."""
        try:
            resp: Any = self._api.list_namespace(
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout,
                _preload_content=False,
                _request_timeout=(10, self.inactivity_timeout),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone() from None
            raise
        self._response = resp
        try:
            for event in self._events(resp):
                rv = self._apply(event, rv)
                yield rv
        finally:
            self._response = None
            resp.release_conn()

    @staticmethod
    def _events(resp: Any) -> Iterator[dict[str, Any]]:
        for line in cast(Iterator[str], iter_resp_lines(resp)):  # type: ignore[no-untyped-call]
            if line.strip():
                yield json.loads(line)

    def _apply(self, event: Mapping[str, Any], rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise RuntimeError(f"watch error: {obj.get('message') or obj}")
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if kind in ("ADDED", "MODIFIED") and name:
            self._labels[name] = _labels(obj)
        elif kind == "DELETED" and name:
            self._labels.pop(name, None)
        elif kind != "BOOKMARK":
            log.warning("unknown watch event type skipped", extra={"type": kind})
        return str(meta.get("resourceVersion") or rv)
