"""The object store: objects, the global resourceVersion, allocations, list snapshots and watches.

WHY: one lock around everything that must be consistent with the resourceVersion (the object, its
allocations, the event history, the watch queues) makes the double's ordering guarantees as strong as
etcd's. Stored objects are never mutated (writes replace them), so readers serialize them unlocked.
Admission webhooks are called BEFORE a write reaches the store, never under its lock.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from sandbox.api import strategy
from sandbox.api.allocation import ServiceAllocator, carry_over
from sandbox.api.errors import ApiError, already_exists, conflict, invalid, not_found
from sandbox.api.resources import ALL, MUTATING_WEBHOOKS, NAMESPACES, SERVICES, ResourceType
from sandbox.api.validation import validate
from sandbox.api.watch import ADDED, DELETED, MODIFIED, Event, History, Watcher
from shared.errors import SandboxError

Obj = dict[str, Any]
Accept = Callable[[Mapping[str, Any]], bool]
_SNAPSHOTS_KEPT = 32


class WatchExpired(SandboxError):
    """The requested resourceVersion is older than the retained history (sent as a 410 ERROR event)."""

    def __init__(self, requested: str, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested, self.oldest = requested, oldest


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _parse_rv(value: str, what: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise ApiError(400, f"invalid {what} {value!r}: must be an integer") from None
    if rv < 0:
        raise ApiError(400, f"invalid {what} {value!r}: must not be negative")
    return rv


class Store:
    def __init__(self, *, history_limit: int, allocator: ServiceAllocator) -> None:
        self.lock = threading.RLock()
        self.rv = 0
        self.objects: dict[ResourceType, dict[tuple[str, str], Obj]] = {rt: {} for rt in ALL}
        self.history = History(history_limit)
        self.allocator = allocator
        self.watchers: set[Watcher] = set()
        self._snapshots: OrderedDict[int, tuple[int, list[Obj]]] = OrderedDict()
        self._snapshot_ids = 0

    # ---- reads -------------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        with self.lock:
            obj = self.objects[rt].get((namespace or "", name))
        if obj is None:
            raise not_found(rt.group, rt.plural, name)
        return obj

    def namespace_labels(self, name: str) -> dict[str, str] | None:
        with self.lock:
            ns = self.objects[NAMESPACES].get(("", name))
        return None if ns is None else dict((ns.get("metadata") or {}).get("labels") or {})

    def webhook_configurations(self) -> list[Obj]:
        with self.lock:
            return [self.objects[MUTATING_WEBHOOKS][k] for k in sorted(self.objects[MUTATING_WEBHOOKS])]

    def list(
        self,
        rt: ResourceType,
        namespace: str | None,
        accept: Accept,
        *,
        limit: int = 0,
        continue_token: str | None = None,
    ) -> tuple[list[Obj], str, str | None, int | None]:
        """(items, resourceVersion, continue, remainingItemCount) — pages of one consistent snapshot."""
        with self.lock:
            if continue_token:
                snap_id, offset = self._decode_continue(continue_token)
                snap = self._snapshots.get(snap_id)
                if snap is None:
                    raise ApiError(
                        410,
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.",
                        reason="Expired",
                    )
                self._snapshots.move_to_end(snap_id)
            else:
                items = [
                    obj
                    for key, obj in sorted(self.objects[rt].items())
                    if (namespace is None or key[0] == namespace) and accept(obj)
                ]
                snap_id, offset, snap = -1, 0, (self.rv, items)
            rv, items = snap
            if limit <= 0 or offset + limit >= len(items):
                return items[offset:], str(rv), None, None
            if snap_id < 0:
                self._snapshot_ids += 1
                snap_id = self._snapshot_ids
                self._snapshots[snap_id] = snap
                while len(self._snapshots) > _SNAPSHOTS_KEPT:
                    self._snapshots.popitem(last=False)
            end = offset + limit
            token = base64.urlsafe_b64encode(json.dumps({"s": snap_id, "o": end, "rv": rv}).encode()).decode()
            return items[offset:end], str(rv), token, len(items) - end

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, int]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            return int(data["s"]), int(data["o"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, f"invalid continue token {token!r}") from None

    # ---- watches -----------------------------------------------------------------------------
    def open_watch(self, rt: ResourceType, namespace: str | None, accept: Accept, resource_version: str) -> Watcher:
        """Register a watch, pre-filled with the replay (or the synthetic ADDEDs for rv ""/"0")."""
        with self.lock:
            if resource_version in ("", "0"):
                watcher = Watcher(rt, namespace, accept, self.rv)
                for key in sorted(self.objects[rt]):
                    obj = self.objects[rt][key]
                    rv = int(obj["metadata"]["resourceVersion"])
                    watcher.push(Event(rv, rt, ADDED, obj))
            else:
                rv = _parse_rv(resource_version, "resourceVersion")
                if rv < self.history.compacted_rv:
                    raise WatchExpired(resource_version, self.history.compacted_rv + 1)
                watcher = Watcher(rt, namespace, accept, min(rv, self.rv))
                for event in self.history.since(rv, rt):
                    watcher.push(event)
            self.watchers.add(watcher)
            return watcher

    def close_watch(self, watcher: Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)
        watcher.close()

    def close_all_watches(self) -> None:
        with self.lock:
            watchers, self.watchers = list(self.watchers), set()
        for w in watchers:
            w.close()

    def bookmark_rv(self, watcher: Watcher) -> int | None:
        """The resourceVersion a bookmark may carry now: the current one, if nothing is queued."""
        with self.lock:
            if watcher.pending():
                return None
            watcher.last_rv = max(watcher.last_rv, self.rv)
            return watcher.last_rv

    def compact(self) -> None:
        with self.lock:
            self.history.compact(self.rv)
            self._snapshots.clear()

    def _emit(self, rt: ResourceType, kind: str, obj: Obj, old: Obj | None = None) -> None:
        event = Event(self.rv, rt, kind, obj, old)
        self.history.append(event)
        for w in self.watchers:
            w.push(event)

    # ---- writes ------------------------------------------------------------------------------
    def _stamp(self, obj: Obj) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    def create(self, rt: ResourceType, obj: Obj, *, dry_run: bool = False) -> Obj:
        """Store a defaulted, admitted object: name generation, validation, allocation, identity."""
        with self.lock:
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = strategy.generate_name(meta["generateName"])
            namespace, name = _key(obj)
            if rt.namespaced and ("", namespace) not in self.objects[NAMESPACES]:
                raise ApiError(404, f'namespaces "{namespace}" not found', details={"name": namespace, "kind": "namespaces"})
            causes = validate(rt.kind, obj)
            if causes:
                raise invalid(rt.kind, name, causes)
            if (namespace, name) in self.objects[rt]:
                raise already_exists(rt.group, rt.plural, name)
            new = strategy.prepare_for_create(rt, obj)
            if rt is SERVICES:
                new = self.allocator.allocate(new)
            if dry_run:
                return new
            if rt is SERVICES:
                self.allocator.commit(new, None)
            self._stamp(new)
            self.objects[rt][(namespace, name)] = new
            self._emit(rt, ADDED, new)
            return new

    def update(
        self,
        rt: ResourceType,
        obj: Obj,
        *,
        subresource: str | None = None,
        precondition_rv: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """Replace an object (main resource or /status). A write that changes nothing is a no-op:
        no new resourceVersion, no event — as on a real cluster."""
        with self.lock:
            namespace, name = _key(obj)
            old = self.objects[rt].get((namespace, name))
            if old is None:
                raise not_found(rt.group, rt.plural, name)
            if precondition_rv and precondition_rv != old["metadata"]["resourceVersion"]:
                raise conflict(rt.group, rt.plural, name)
            new = strategy.prepare_for_update(rt, obj, old, subresource)
            if rt is SERVICES and subresource is None:
                new = carry_over(new, old)
            causes = validate(rt.kind, new)
            if causes:
                raise invalid(rt.kind, name, causes)
            if rt is SERVICES:
                new = self.allocator.allocate(new, old)
            new["metadata"]["generation"] = strategy.next_generation(rt, new, old)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if strategy.comparable(new) == strategy.comparable(old) or dry_run:
                return old if not dry_run else new
            if rt is SERVICES:
                self.allocator.commit(new, old)
            self._stamp(new)
            self.objects[rt][(namespace, name)] = new
            self._emit(rt, MODIFIED, new, old)
            return new

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        precondition_uid: str | None = None,
        precondition_rv: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """Remove an object at once (no finalizers, no grace period). Deleting a Namespace deletes
        what it contains first, each with its own DELETED event."""
        with self.lock:
            key = (namespace or "", name)
            old = self.objects[rt].get(key)
            if old is None:
                raise not_found(rt.group, rt.plural, name)
            meta = old["metadata"]
            if precondition_uid and precondition_uid != meta.get("uid"):
                raise ApiError(409, f"Precondition failed: UID in precondition: {precondition_uid}, "
                               f"UID in object meta: {meta.get('uid')}", reason="Conflict")
            if precondition_rv and precondition_rv != meta.get("resourceVersion"):
                raise ApiError(409, f"Precondition failed: ResourceVersion in precondition: {precondition_rv}, "
                               f"ResourceVersion in object meta: {meta.get('resourceVersion')}", reason="Conflict")
            if dry_run:
                return old
            if rt is NAMESPACES:
                for inner in (t for t in ALL if t.namespaced):
                    for inner_key in [k for k in self.objects[inner] if k[0] == name]:
                        self._remove(inner, inner_key)
            return self._remove(rt, key)

    def _remove(self, rt: ResourceType, key: tuple[str, str]) -> Obj:
        old = self.objects[rt].pop(key)
        if rt is SERVICES:
            self.allocator.commit(None, old)
        gone = dict(old)
        gone["metadata"] = dict(old["metadata"])
        self._stamp(gone)
        self._emit(rt, DELETED, gone)
        return gone
