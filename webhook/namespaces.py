"""Namespace labels for the policy: a watched cache, and a GET for a namespace not seen yet.

The cache is a sink of the project's one list-watch reflector (``shared.kube.Reflector``: paged list,
watch from its resourceVersion with bookmarks, re-watch after a broken or silent stream, re-list on 410,
jittered backoff), run on a thread of its own.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shared.kube import Reflector
from shared.kubeapi import NAMESPACES, Api

log = logging.getLogger("lightpath.webhook.namespaces")


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def _without_retries(api_client: client.ApiClient) -> client.ApiClient:
    """A client on the same configuration whose requests urllib3 never retries. By default it retries
    a timed-out GET three more times, each with the full timeout: 2 s became 8 s against a hung API."""
    configuration = copy.copy(api_client.configuration)
    configuration.retries = False
    return client.ApiClient(configuration)


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
        self._api = Api(api_client)
        self._lookup_api = Api(_without_retries(api_client))
        self.watch_timeout = watch_timeout
        self.inactivity_timeout = inactivity_timeout
        self.lookup_timeout = lookup_timeout
        self.page_size = page_size
        self.max_backoff = max_backoff
        self._labels: dict[str, dict[str, str]] = {}
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._reflector = self._new_reflector()

    def _new_reflector(self) -> Reflector:
        return Reflector(self._api.lister(NAMESPACES), self, what="namespaces", server_timeout=self.watch_timeout,
                         read_timeout=self.inactivity_timeout, page_size=self.page_size,
                         backoff_base=min(0.5, self.max_backoff), backoff_max=self.max_backoff)

    @property
    def restarts(self) -> int:
        """Watches given up after an error or a silent stream."""
        return self._reflector.restarts

    @property
    def relists(self) -> int:
        """Lists forced by 410 Gone."""
        return self._reflector.relists

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
        the Service anyway). The result only fills a gap: the watch stays the source of truth.

        One try, ``lookup_timeout`` seconds in total (connect and read), never retried: the review it
        serves must answer within the webhook's timeoutSeconds (3), and a failed lookup only means the
        Service is allowed untouched."""
        try:
            found = self._lookup_api.get(NAMESPACES, None, name, timeout=self.lookup_timeout)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        labels = _labels(found)
        self._labels.setdefault(name, labels)
        return labels

    # -- the watch thread --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            if self._reflector.stopped:
                self._reflector = self._new_reflector()
            self._thread = threading.Thread(target=self._reflector.run, name="namespace-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._reflector.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- WatchSink (called on the watch thread) -------------------------------------------------
    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        """A full list replaces the cache (built aside: a list that fails half-way publishes nothing)."""
        fresh: dict[str, dict[str, str]] = {}
        for item in items:
            name = (item.get("metadata") or {}).get("name")
            if name:
                fresh[str(name)] = _labels(item)
        self._labels = fresh
        self._synced.set()
        log.info("namespace cache synced", extra={"namespaces": len(fresh)})

    def upsert(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if name:
            self._labels[str(name)] = _labels(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if name:
            self._labels.pop(str(name), None)

    def restarted(self, reason: str) -> None:
        log.debug("namespace watch restarted", extra={"reason": reason})
