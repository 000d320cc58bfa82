"""What the watch reported since the last sync: the latest entries per Service, and since when they wait.

The watch thread calls ``replace``/``upsert``/``delete``/``restarted`` (the ``WatchSink`` protocol) and
never waits on a kernel transaction. Like kube-proxy's change tracker it projects each object on arrival
(``service_entries``: pure, ~3-6 µs) and keeps only that, so the API's dicts are garbage as soon as they are
seen: a list of 10,000 Services never sits in memory whole. A Service edited ten times before the next sync
is ONE pending change (its latest entries), whose latency counts from the first of those events. The sync
loop ``take``s everything at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redirector.desired import ServiceEntries, ServiceId, service_entries, service_id


@dataclass
class _Pending:
    entries: ServiceEntries | None  # None: deleted (or no longer labelled)
    since: float  # monotonic time the first still-pending change of this Service arrived
    handback: bool = False  # entries None because the label went while the Service stays (not deleted)


class ChangeTracker:
    """What the watch reported since the last sync. Thread-safe; every call is O(1) (``replace``: O(n))."""

    def __init__(self, proxy_label: tuple[str, str]) -> None:
        self._label_key, self._label_value = proxy_label
        self._cond = threading.Condition()
        self._changes: dict[ServiceId, _Pending] = {}
        self._relist: tuple[list[tuple[ServiceId, ServiceEntries]], float] | None = None
        self.listed = threading.Event()  # set once the first list completed
        self.restarts: list[str] = []
        self.last_event = 0.0  # monotonic time of the newest change

    # WatchSink
    def replace(self, services: Iterable[dict[str, Any]]) -> None:
        """A complete list. ``services`` may be a generator fetching pages: if it raises half-way, nothing
        of it is published."""
        listed = [(service_id(s), service_entries(s)) for s in services if self._ours(s)]
        now = time.monotonic()
        with self._cond:
            self._relist = (listed, now)
            self._changes.clear()  # the list supersedes them
            self.last_event = now
            self.listed.set()
            self._cond.notify_all()

    def upsert(self, service: dict[str, Any]) -> None:
        ours = self._ours(service)
        self._record(service_id(service), service_entries(service) if ours else None, handback=not ours)

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

    def _record(self, sid: ServiceId, entries: ServiceEntries | None, *, handback: bool = False) -> None:
        now = time.monotonic()
        with self._cond:
            previous = self._changes.get(sid)
            self._changes[sid] = _Pending(entries, previous.since if previous else now, handback)
            self.last_event = now
            self._cond.notify_all()

    # sync side
    def has_work(self) -> bool:
        return bool(self._changes) or self._relist is not None or bool(self.restarts)

    def take(
        self,
    ) -> tuple[tuple[list[tuple[ServiceId, ServiceEntries]], float] | None, dict[ServiceId, _Pending], list[str]]:
        with self._cond:
            relist, changes, restarts = self._relist, self._changes, self.restarts
            self._relist, self._changes, self.restarts = None, {}, []
            return relist, changes, restarts

    @property
    def cond(self) -> threading.Condition:
        return self._cond
