"""Watch streams: event history, per-watch queues, selector transitions, bookmarks and stalls.

WHY: watch semantics are what the redirector and the CLI depend on most — replay from a
resourceVersion, 410 Gone when history is gone, DELETED/ADDED when an object stops/starts matching the
selector, bookmarks that advance the resourceVersion. This module holds those rules; the store feeds it
and the HTTP layer drains it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.api.resources import ResourceType

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"


@dataclass(frozen=True)
class Event:
    """One change to one object; `old` is the previous state for MODIFIED (selector transitions)."""

    rv: int
    rt: ResourceType
    type: str
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None = None


def translate(
    event: Event,
    namespace: str | None,
    accept: Callable[[Mapping[str, Any]], bool],
) -> tuple[str, Mapping[str, Any]] | None:
    """What a watch with this scope and filter sees of `event` (None: nothing).

    A MODIFIED object that stops matching is a DELETED for this watch, one that starts matching an
    ADDED — exactly what the real watch cache sends. Like kube-apiserver's cacheWatcher, that DELETED
    carries the PREVIOUS object (the last state this watch matched) stamped with the event's
    resourceVersion, so a client resuming from it neither replays nor skips an event.
    """
    meta = event.obj.get("metadata") or {}
    if namespace is not None and meta.get("namespace") != namespace:
        return None
    now = accept(event.obj)
    if event.type != MODIFIED:
        return (event.type, event.obj) if now else None
    before = event.old is not None and accept(event.old)
    if now and before:
        return MODIFIED, event.obj
    if now:
        return ADDED, event.obj
    if before:
        assert event.old is not None
        return DELETED, _with_rv(event.old, str(event.rv))
    return None


def _with_rv(obj: Mapping[str, Any], rv: str) -> dict[str, Any]:
    """A shallow copy of ``obj`` with metadata.resourceVersion = rv (stored objects are never mutated)."""
    out = dict(obj)
    out["metadata"] = {**(obj.get("metadata") or {}), "resourceVersion": rv}
    return out


class Watcher:
    """One open watch: a queue the store fills (under its lock) and the HTTP thread drains."""

    def __init__(
        self,
        rt: ResourceType,
        namespace: str | None,
        accept: Callable[[Mapping[str, Any]], bool],
        last_rv: int,
    ) -> None:
        self.rt = rt
        self.namespace = namespace
        self.accept = accept
        self.last_rv = last_rv  # highest resourceVersion this watch has been told about
        self._queue: deque[Event] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def push(self, event: Event) -> None:
        if event.rt is not self.rt:
            return
        with self._cond:
            self._queue.append(event)
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)

    def drain(self) -> list[tuple[str, Mapping[str, Any]]]:
        """The events to send now, already translated for this watch's filter."""
        with self._cond:
            events = list(self._queue)
            self._queue.clear()
        out = []
        for ev in events:
            self.last_rv = max(self.last_rv, ev.rv)
            seen = translate(ev, self.namespace, self.accept)
            if seen is not None:
                out.append(seen)
        return out

    def pending(self) -> bool:
        with self._cond:
            return bool(self._queue)


class History:
    """The retained event log: the newest `limit` events. Older resourceVersions are 'compacted'."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._events: deque[Event] = deque(maxlen=limit)
        self.compacted_rv = 0  # every event with rv <= this is gone

    def append(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:
            self.compacted_rv = self._events[0].rv
        self._events.append(event)

    def compact(self, current_rv: int) -> None:
        self._events.clear()
        self.compacted_rv = current_rv

    def since(self, rv: int, rt: ResourceType) -> list[Event]:
        """Events after `rv` for `rt`; the caller has checked rv >= compacted_rv."""
        return [e for e in self._events if e.rv > rv and e.rt is rt]


def bookmark(rt: ResourceType, rv: int) -> dict[str, Any]:
    return {"type": BOOKMARK, "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                          "metadata": {"resourceVersion": str(rv)}}}


def gone(requested: int | str, oldest: int) -> dict[str, Any]:
    return {
        "type": ERROR,
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {requested} ({oldest})",
            "reason": "Expired",
            "code": 410,
        },
    }
