"""What the watch reported since the last sync: the latest object per Service, and since when it waits.

The watch thread calls ``replace``/``upsert``/``delete``/``restarted`` (the ``WatchSink`` protocol) and
must never wait on a kernel transaction, so each call is a dict update under a lock plus a notify. A
Service edited ten times before the next sync is ONE pending change (the latest object), whose latency
is counted from the first of those events. The sync loop ``take``s everything at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from redirector.desired import ServiceId, service_id


@dataclass
class _Pending:
    service: dict[str, Any] | None  # None: deleted
    since: float  # monotonic time the first still-pending change of this Service arrived


class ChangeTracker:
    """What the watch reported since the last sync. Thread-safe; every call is O(1) (``replace``: O(n))."""

    def __init__(self, proxy_label: tuple[str, str]) -> None:
        self._label_key, self._label_value = proxy_label
        self._cond = threading.Condition()
        self._changes: dict[ServiceId, _Pending] = {}
        self._relist: tuple[list[dict[str, Any]], float] | None = None
        self.listed = threading.Event()  # set once the first list completed
        self.restarts: list[str] = []
        self.last_event = 0.0  # monotonic time of the newest change

    # WatchSink
    def replace(self, services: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self._cond:
            self._relist = ([s for s in services if self._ours(s)], now)
            self._changes.clear()  # the list supersedes them
            self.last_event = now
            self.listed.set()
            self._cond.notify_all()

    def upsert(self, service: dict[str, Any]) -> None:
        self._record(service_id(service), service if self._ours(service) else None)

    def delete(self, service: dict[str, Any]) -> None:
        self._record(service_id(service), None)

    def restarted(self, reason: str) -> None:
        with self._cond:
            self.restarts.append(reason)
            self._cond.notify_all()

    def _ours(self, service: dict[str, Any]) -> bool:
        """A label-selector watch sends DELETED when the label goes; checking here too costs nothing."""
        labels = (service.get("metadata") or {}).get("labels") or {}
        return isinstance(labels, dict) and labels.get(self._label_key) == self._label_value

    def _record(self, sid: ServiceId, service: dict[str, Any] | None) -> None:
        now = time.monotonic()
        with self._cond:
            previous = self._changes.get(sid)
            self._changes[sid] = _Pending(service, previous.since if previous else now)
            self.last_event = now
            self._cond.notify_all()

    # sync side
    def has_work(self) -> bool:
        return bool(self._changes) or self._relist is not None or bool(self.restarts)

    def take(self) -> tuple[tuple[list[dict[str, Any]], float] | None, dict[ServiceId, _Pending], list[str]]:
        with self._cond:
            relist, changes, restarts = self._relist, self._changes, self.restarts
            self._relist, self._changes, self.restarts = None, {}, []
            return relist, changes, restarts

    @property
    def cond(self) -> threading.Condition:
        return self._cond
