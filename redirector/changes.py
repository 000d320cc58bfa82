"""What the watch reported since the last sync: the latest entries per Service, and since when they wait.

The watch thread calls ``replace``/``upsert``/``delete``/``restarted`` (the ``WatchSink`` protocol) and
never waits on a kernel transaction. Like kube-proxy's change tracker it projects each object on arrival
(``service_entries``: pure, ~3-6 µs) and keeps only that, so the API's dicts are garbage as soon as they are
seen: a list of 10,000 Services never sits in memory whole. A Service edited ten times before the next sync
is ONE pending change (its latest entries), whose latency counts from the first of those events. The sync
loop ``drain_into``s its desired-state index everything at once and gets back what that changed (``Drained``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redirector.desired import DesiredIndex, ServiceEntries, ServiceId, service_entries, service_id
from redirector.model import Delta, Key
from shared import constants as c
from shared import policy


@dataclass
class Change:
    """One Service's pending change: its latest entries, and since when it waits."""

    entries: ServiceEntries | None  # None: deleted (or no longer labelled)
    since: float  # monotonic time the first still-pending change of this Service arrived
    handback: bool = False  # entries None because the label went while the Service stays (not deleted)
    # When this agent saw the handoff label arrive (monotonic; 0.0 = before this agent started), for a
    # handback: kube-proxy may still be about to apply that label (its syncs are rate-limited), so a rule of
    # its seen before then + a settle period may be one it is about to remove (``Agent``'s hold).
    labelled_at: float | None = None


@dataclass(frozen=True)
class Drained:
    """What one ``drain_into`` folded into the index: what the sync that follows needs to know."""

    # Every key whose being desired changed at some point in the batch, split by whether it is desired after
    # it (a key removed and re-added within the batch is in ``add``: the caller compares with what it applied).
    delta: Delta
    # Keys a handback (the label went, the Service stays) took out of the index -> when this agent saw that
    # Service's label arrive (0.0: before it started); ``Agent`` holds them until kube-proxy serves them.
    handed_back: dict[Key, float]
    problems: list[tuple[ServiceId, ServiceEntries]]  # Services that changed to entries with unserved ports/errors
    arrivals: list[float]  # monotonic arrival of each folded change (and of the list): event-to-rule latency
    size: int  # Services folded (the batch-size metric)
    restarts: list[str]  # watch restarts reported since the last drain


class ChangeTracker:
    """What the watch reported since the last sync. Thread-safe; every call is O(1) (``replace``: O(n))."""

    def __init__(self, proxy_label: tuple[str, str]) -> None:
        self._label_key, self._label_value = proxy_label
        self._cond = threading.Condition()
        self._changes: dict[ServiceId, Change] = {}
        self._relist: tuple[list[tuple[ServiceId, ServiceEntries]], float] | None = None
        self.listed = threading.Event()  # set once the first list completed
        self.restarts: list[str] = []
        self.last_event = 0.0  # monotonic time of the newest change
        # Services marked for a make-before-break migration (not yet labelled): redirected like ours so the
        # label can follow once every node is prepared (docs/migration.md, "Handover protocol").
        self.marked: set[ServiceId] = set()
        self.labelled_at: dict[ServiceId, float] = {}  # labelled Services -> when the label was first seen
        self.marked_at: dict[ServiceId, float] = {}  # marked Services -> when this agent first saw the mark
        # Called (outside the lock) when a mark goes: (sid, "migrated" | "aborted" | "deleted", seconds marked).
        self.on_handover: Callable[[ServiceId, str, float], None] | None = None

    # WatchSink
    def replace(self, services: Iterable[dict[str, Any]]) -> None:
        """A complete list. ``services`` may be a generator fetching pages: if it raises half-way, nothing
        of it is published."""
        listed: list[tuple[ServiceId, ServiceEntries]] = []
        marked: set[ServiceId] = set()
        labelled: list[ServiceId] = []
        for s in services:
            if self._ours(s):
                listed.append((service_id(s), service_entries(s)))
                if self._marked(s):
                    marked.add(service_id(s))
                elif self._labelled(s):
                    labelled.append(service_id(s))
        now = time.monotonic()
        with self._cond:
            self.marked = marked
            # The first list: labelled before this agent started (0.0); a relist: new ones count from now.
            first = 0.0 if not self.listed.is_set() else now
            self.labelled_at = {sid: self.labelled_at.get(sid, first) for sid in labelled}
            self.marked_at = {sid: self.marked_at.get(sid, now) for sid in marked}
            self._relist = (listed, now)
            self._changes.clear()  # the list supersedes them
            self.last_event = now
            self.listed.set()
            self._cond.notify_all()

    def upsert(self, service: dict[str, Any]) -> None:
        ours = self._ours(service)
        sid = service_id(service)
        labelled_at: float | None = None
        ended: tuple[str, float] | None = None
        now = time.monotonic()
        with self._cond:
            if ours and self._marked(service):
                self.marked.add(sid)
                self.marked_at.setdefault(sid, now)
            else:
                self.marked.discard(sid)
                if sid in self.marked_at:
                    ended = ("migrated" if self._labelled(service) else "aborted", now - self.marked_at.pop(sid))
            if self._labelled(service):
                self.labelled_at.setdefault(sid, time.monotonic())
            else:
                labelled_at = self.labelled_at.pop(sid, None)
        self._record(sid, service_entries(service) if ours else None, handback=not ours, labelled_at=labelled_at)
        if ended is not None and self.on_handover is not None:
            self.on_handover(sid, *ended)

    def delete(self, service: dict[str, Any]) -> None:
        # Never project a deleted object: a selector-filtered watch sends DELETED with the OLD content under
        # the NEW resourceVersion, which service_entries' shared memo would then hand to the other consumer.
        sid = service_id(service)
        with self._cond:
            self.marked.discard(sid)
            self.labelled_at.pop(sid, None)
            since = self.marked_at.pop(sid, None)
        self._record(sid, None)
        if since is not None and self.on_handover is not None:
            self.on_handover(sid, "deleted", time.monotonic() - since)

    def restarted(self, reason: str) -> None:
        with self._cond:
            self.restarts.append(reason)
            self._cond.notify_all()

    def _marked(self, service: dict[str, Any]) -> bool:
        """Marked for migration, no handoff label yet, and eligible (a garbage value or an ineligible Service
        is ignored: never a half-migrated Service)."""
        meta = service.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        if not isinstance(annotations, dict) or annotations.get(c.HANDOVER_ANNOTATION) != c.HANDOVER_MIGRATE:
            return False
        if not isinstance(labels, dict) or c.SERVICE_PROXY_NAME_LABEL in labels:
            return False
        try:
            return policy.ineligibility(service) is None
        except Exception:  # noqa: BLE001 - the policy never raises; if it did, not marked
            return False

    def _labelled(self, service: dict[str, Any]) -> bool:
        """Labelled for our proxy: the one place the label filter is configured."""
        labels = (service.get("metadata") or {}).get("labels") or {}
        return isinstance(labels, dict) and labels.get(self._label_key) == self._label_value

    def _ours(self, service: dict[str, Any]) -> bool:
        """Labelled for our proxy, or marked for migration."""
        return self._labelled(service) or self._marked(service)

    def _record(self, sid: ServiceId, entries: ServiceEntries | None, *, handback: bool = False,
                labelled_at: float | None = None) -> None:
        now = time.monotonic()
        with self._cond:
            previous = self._changes.get(sid)
            if labelled_at is None and previous is not None:
                labelled_at = previous.labelled_at
            self._changes[sid] = Change(entries, previous.since if previous else now, handback, labelled_at)
            self.last_event = now
            self._cond.notify_all()

    # sync side
    def has_work(self) -> bool:
        return bool(self._changes) or self._relist is not None or bool(self.restarts)

    def drain_into(self, index: DesiredIndex) -> Drained:
        """Fold everything pending into ``index`` (and forget it): the sync loop's only way in.

        The pending batch is taken under the tracker's lock; the fold runs outside it (the watch thread never
        waits for it). The caller serialises access to ``index`` (``Agent`` holds its own lock around this)."""
        with self._cond:
            relist, changes, restarts = self._relist, self._changes, self.restarts
            self._relist, self._changes, self.restarts = None, {}, []
        touched: set[Key] = set()
        handed_back: dict[Key, float] = {}
        problems: list[tuple[ServiceId, ServiceEntries]] = []
        if relist is not None:
            delta = index.replace_entries(relist[0])
            touched |= delta.add | delta.delete
        for sid, change in changes.items():
            before = index.get(sid)
            delta = index.put(sid, change.entries)
            touched |= delta.add | delta.delete
            if change.handback and before is not None:
                handed_back.update(dict.fromkeys(delta.delete, change.labelled_at or 0.0))
            after = index.get(sid)
            if after is not None and (after.unserved or after.errors) and after != before:
                problems.append((sid, after))
        add = frozenset(k for k in touched if index.has_key(k))
        return Drained(
            delta=Delta(add=add, delete=frozenset(touched) - add),
            handed_back=handed_back,
            problems=problems,
            arrivals=[c.since for c in changes.values()] + ([relist[1]] if relist is not None else []),
            size=len(changes) + (len(relist[0]) if relist is not None else 0),
            restarts=restarts,
        )

    @property
    def cond(self) -> threading.Condition:
        return self._cond
