"""The node agent: watched Services -> desired state -> kernel, kube-proxy style.

- The watch thread only records changes (``ChangeTracker``): the latest object per Service and when its
  first pending change arrived. Nothing else happens on the watch thread.
- One sync thread does all the work. It does nothing until the first list completed (so a restarting agent
  never programs a half-known state over the rules it inherited). Then:
  * a pending change is applied after a short coalescing window (``batch_idle`` of quiet, at most
    ``batch_max`` after the first change): one change is live in a few ms, a burst of N changes becomes
    a handful of transactions;
  * incremental sync = recompute the changed Services only, apply the key delta (ONE transaction);
  * full sync (first, after a failed transaction, every ``resync_period``) = ``backend.ensure(all keys)``,
    which compares with what the kernel really holds; a periodic one that had to repair counts as drift.
- SIGTERM (``stop``) leaves the rules in place.

``Agent`` is also the one object a debug server reads: ``snapshot()``, ``desired()``, ``metrics.registry``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redirector import memory
from redirector.changes import ChangeTracker
from redirector.desired import DesiredIndex, ServiceEntries, ServiceId
from redirector.metrics import Metrics
from redirector.model import Backend, Delta, DesiredState, Gate, Key
from shared.batching import wait_for_quiet

if TYPE_CHECKING:  # types only: the sync core imports neither the control plane nor the watches
    from controlplane.controller import ControlPlane
    from redirector.fallback import Watchdog
    from redirector.watch import ServiceWatcher

log = logging.getLogger(__name__)
__all__ = ["Agent", "ChangeTracker", "SyncStatus"]


@dataclass
class SyncStatus:
    """Facts about the last syncs, for health and debug endpoints (wall-clock times)."""

    first_sync_done: bool = False
    last_full_sync: float | None = None
    last_incremental_sync: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    full_sync_pending: bool = True
    transactions: int = 0
    changes_applied: int = 0
    history: list[str] = field(default_factory=list)  # restart reasons, newest last (bounded)


class Agent:
    """Runs the sync loop against ``backend``; ``tracker`` is fed by a ``ServiceWatcher``."""

    def __init__(
        self,
        backend: Backend,
        *,
        proxy_label: tuple[str, str],
        resync_period: float = 30.0,
        batch_idle: float = 0.002,
        batch_max: float = 0.010,
        retry_min: float = 0.2,
        retry_max: float = 10.0,
        metrics: Metrics | None = None,
        tracker: ChangeTracker | None = None,
        watcher: ServiceWatcher | None = None,
        clock: Callable[[], float] = time.time,
        gate: Gate | None = None,
        plane: ControlPlane | None = None,
        kube_proxy: Callable[[], frozenset[Key] | None] | None = None,
        handback_hold: float = 2.0,
        handback_timeout: float = 10.0,
    ) -> None:
        if resync_period <= 0 or batch_idle < 0 or batch_max < batch_idle:
            raise ValueError("resync_period must be > 0 and 0 <= batch_idle <= batch_max")
        self.backend = backend
        # The tracker is the watch's sink: built with the watch (redirector.node) and handed in with it (the
        # watcher: its resourceVersion and connection for debug endpoints); a bare Agent (tests) builds its own.
        self.tracker = tracker if tracker is not None else ChangeTracker(proxy_label)
        self.watcher = watcher
        self.metrics = metrics or Metrics()
        self.status = SyncStatus()
        self.index = DesiredIndex()
        self.resync_period = resync_period
        self.batch_idle, self.batch_max = batch_idle, batch_max
        self.retry_min, self.retry_max = retry_min, retry_max
        self._clock = clock
        self._applied: set[Key] = set()  # what we believe the kernel holds (after our last success)
        # ``_applied`` can be trusted: a full sync succeeded and none failed since (a failed incremental
        # transaction applied nothing: the Backend contract).
        self._belief_ok = False
        self._lock = threading.Lock()  # index + applied, against readers (debug server)
        self._stop = threading.Event()
        self._next_full = 0.0  # monotonic deadline of the next periodic full sync
        self._retry_delay = retry_min
        self._retry_at = 0.0
        self._cpu_started = 0.0
        self._counts = {(f, m): 0 for f in ("ipv4", "ipv6") for m in ("address", "nodePort")}
        # The newest event-to-rule latencies (seconds), exact, for debug endpoints and benchmarks.
        self.latencies: deque[float] = deque(maxlen=4096)
        # Times the sync loop looked and found nothing due (read under ``tracker.cond``): lets a test see the
        # loop considered an event and chose to wait, instead of sleeping and hoping.
        self.idle_checks = 0
        # The gate (the control plane): a key enters the kernel only once the proxy serves it. Keys the gate
        # reports as possibly servable wait in ``_gate_pending`` for the next sync; keys already in the
        # kernel stay whatever the gate says (Envoy keeps serving its last configuration).
        self.gate = gate
        self.plane = plane  # the control plane, when there is one (health and debug endpoints); it is the gate
        # The kernel fallback's watchdog, when there is one: set by ``redirector.node.build`` after this
        # constructor, as the watchdog is built from this agent (its applied keys, metrics and status).
        self.fallback: Watchdog | None = None
        self._gate_pending: set[Key] = set()
        self._inherited: frozenset[Key] = frozenset()  # what the kernel held when this agent started
        self._inherited_read = False  # read once: a retried first full sync does not read it again
        self._first_full = True
        # Handback (make-before-break): keys of Services whose label went (not deleted) stay in the kernel until
        # kube-proxy's rule for them is visible (``kube_proxy`` reads it), at most ``handback_timeout``; when
        # kube-proxy's rules cannot be read, for ``handback_hold`` (>= 2 x kube-proxy's minSyncPeriod).
        self.kube_proxy = kube_proxy
        self.handback_hold, self.handback_timeout = handback_hold, handback_timeout
        # key -> (since, deadline, settled): monotonic. A kube-proxy rule counts only from ``settled`` on: until
        # the label that took the Service from kube-proxy is handback_hold old, kube-proxy may still be about to
        # apply it (rate-limited syncs) and remove the very rule we see (a rollback right after a migration).
        self._held: dict[Key, tuple[float, float, float]] = {}
        self.on_synced: Callable[[], None] | None = None  # after each successful sync (the Lease reporter)
        self._reported = -1
        self._next_hold_check = 0.0
        self._prepared_seen: set[ServiceId] = set()  # marked Services already counted as prepared
        self.tracker.on_handover = self._handover_ended

    # -- reading (debug server) -----------------------------------------------------------------------

    def desired(self) -> DesiredState:
        with self._lock:
            return self.index.state()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary of the agent's state."""
        with self._lock:
            services, keys = len(self.index), len(self.index.keys())
            applied = len(self._applied)
            unserved, errors = self.index.unserved_count, self.index.error_count
        s = self.status
        return {
            "backend": getattr(self.backend, "name", type(self.backend).__name__),
            "listed": self.tracker.listed.is_set(),
            "services": services,
            "desired_entries": keys,
            "applied_entries": applied,
            "unserved_ports": unserved,
            "services_with_errors": errors,
            "first_sync_done": s.first_sync_done,
            "full_sync_pending": s.full_sync_pending,
            "last_full_sync": s.last_full_sync,
            "last_incremental_sync": s.last_incremental_sync,
            "last_success": s.last_success,
            "last_error": s.last_error,
            "last_error_time": s.last_error_time,
            "transactions": s.transactions,
            "resource_version": self.watcher.resource_version if self.watcher is not None else None,
            "watch_connected": self.watcher.connected if self.watcher is not None else None,
        }

    # -- running --------------------------------------------------------------------------------------

    def gate_changed(self, keys: Iterable[Key]) -> None:
        """The gate says these keys may have become servable: look at them in the next sync (any thread)."""
        with self.tracker.cond:
            self._gate_pending.update(keys)
            self.tracker.cond.notify_all()

    def gated(self) -> int:
        """Desired keys not in the kernel because the proxy does not serve them yet."""
        with self._lock:
            return len(self.index.keys() - self._applied)

    def _servable(self, keys: Iterable[Key]) -> set[Key]:
        keys = set(keys)
        if self.gate is None or not keys:
            return keys
        return self.gate.servable(keys) | (keys & self._inherited)

    def stop(self) -> None:
        self._stop.set()
        with self.tracker.cond:
            self.tracker.cond.notify_all()

    def run(self) -> None:
        """The sync loop (call in its own thread). Returns after ``stop()``; the kernel rules stay."""
        cond = self.tracker.cond
        while not self._stop.is_set():
            with cond:
                while not self._stop.is_set() and not self._due():
                    self.idle_checks += 1
                    cond.wait(timeout=self._wait_time())
            if self._stop.is_set():
                break
            self._coalesce()
            self.sync_once()

    def _due(self) -> bool:
        if not self.tracker.listed.is_set():
            return False
        now = time.monotonic()
        if self.status.full_sync_pending or now >= self._next_full:
            return now >= self._retry_at if self.status.last_error_time is not None else True
        return self.tracker.has_work() or bool(self._gate_pending) or (bool(self._held) and now >= self._next_hold_check)

    def _wait_time(self) -> float:
        if not self.tracker.listed.is_set():
            return 1.0
        deadline = self._next_full if not self.status.full_sync_pending else self._retry_at
        if self._held:
            deadline = min(deadline, self._next_hold_check)
        return max(0.0, min(1.0, deadline - time.monotonic()))

    def _coalesce(self) -> None:
        """Wait until the stream has been quiet for ``batch_idle``, or ``batch_max`` after the first change."""
        if self.batch_max <= 0:
            return
        with self.tracker.cond:
            wait_for_quiet(self.tracker.cond, lambda: self.tracker.last_event, self.batch_idle, self.batch_max,
                           self._stop.is_set)

    def sync_once(self) -> None:
        """Fold pending changes into the desired state and program the kernel (one or two transactions)."""
        with self.tracker.cond:
            gate_pending, self._gate_pending = self._gate_pending, set()
        started, self._cpu_started = time.perf_counter(), time.thread_time()
        now = time.monotonic()
        with self._lock:
            drained = self.tracker.drain_into(self.index)
            for sid, found in drained.problems:
                self._log_problems(sid, found)
            touched = drained.delta.add | drained.delta.delete | gate_pending
            for key in [k for k in self._held if self.index.has_key(k)]:
                del self._held[key]  # wanted again (labelled again): simply stays
            for key, labelled_at in drained.handed_back.items():
                if key in self._applied and not self.index.has_key(key):
                    self._held.setdefault(key, (now, now + self.handback_timeout, labelled_at + self.handback_hold))
            wanted = {k for k in touched if self.index.has_key(k) and k not in self._applied}
            delete = frozenset(k for k in touched if k in self._applied and not self.index.has_key(k)
                               and k not in self._held)
            if self._held and now >= self._next_hold_check:
                delete |= self._release_held(now)
        for reason in drained.restarts:
            self.metrics.watch_restarts.labels(reason).inc()
        add = frozenset(self._servable(wanted))
        arrivals = drained.arrivals
        self.metrics.batch_size.observe(drained.size)
        now = time.monotonic()
        periodic = now >= self._next_full and not self.status.full_sync_pending
        if self.status.full_sync_pending or periodic:
            if periodic and (add or delete):  # apply the fresh changes first, so they never count as drift
                if not self._incremental(Delta(add, delete), started, arrivals):
                    return
                arrivals, started = [], time.perf_counter()
            self._full(started, arrivals, periodic=periodic)
        elif add or delete or arrivals:
            self._incremental(Delta(add, delete), started, arrivals)

    def _release_held(self, now: float) -> frozenset[Key]:
        """Held keys kube-proxy now serves, or whose hold ran out (under ``_lock``)."""
        self._next_hold_check = now + 0.02
        serving: frozenset[Key] | None = None
        if self.kube_proxy is not None:
            try:
                serving = self.kube_proxy()
            except Exception as exc:  # noqa: BLE001 - cannot tell: the bounded hold applies
                log.warning("reading kube-proxy's rules failed", extra={"error": str(exc)[:300]})
        released: set[Key] = set()
        for key, (since, deadline, settled) in list(self._held.items()):
            if serving is not None and key in serving and now >= settled:
                why = "kube-proxy"
            elif now >= (deadline if serving is not None else since + self.handback_hold):
                why = "timeout" if serving is not None else "hold"
            else:
                continue
            del self._held[key]
            released.add(key)
            self.metrics.handback.labels(why).observe(now - since)
            if why == "timeout":
                log.warning("handback: kube-proxy's rule did not appear in time; the redirect goes anyway",
                            extra={"key": str(key), "waited_s": round(now - since, 3)})
        return frozenset(released)

    def prepared(self) -> list[str]:
        """Services marked for migration whose every redirect is in the kernel (so Envoy serves them here)."""
        with self.tracker.cond:
            marked = sorted(self.tracker.marked)
        with self._lock:
            out = []
            for sid in marked:
                entries = self.index.get(sid)
                if entries is not None and entries.keys and all(k in self._applied for k in entries.keys):
                    out.append(sid)
            for sid in out:
                if sid not in self._prepared_seen:
                    self._prepared_seen.add(sid)
                    since = self.tracker.marked_at.get(sid)
                    if since is not None:
                        self.metrics.handover_prepare.observe(time.monotonic() - since)
            return out

    def _handover_ended(self, sid: ServiceId, outcome: str, seconds: float) -> None:
        """The tracker saw a Service's mark go (the watch thread)."""
        self.metrics.handovers.labels(outcome).inc()
        self.metrics.handover_duration.labels(outcome).observe(seconds)
        with self._lock:
            self._prepared_seen.discard(sid)
        if outcome == "aborted":
            log.warning("handover aborted: the mark went without the handoff label (the Service stays with "
                        "kube-proxy)", extra={"service": sid, "marked_s": round(seconds, 3)})

    def applied_keys(self) -> frozenset[Key]:
        """What this agent has put in the kernel (its belief after the last successful sync)."""
        with self._lock:
            return frozenset(self._applied)

    def applied_count(self) -> int:
        """How many keys ``applied_keys`` holds, without copying them (the Lease reads it on every wake)."""
        with self._lock:
            return len(self._applied)

    def held(self) -> dict[str, float]:
        """Keys held for a handback, with seconds held so far (debug endpoints)."""
        now = time.monotonic()
        with self._lock:
            return {str(k): round(now - since, 3) for k, (since, _, _) in self._held.items()}

    # -- the two kinds of sync ------------------------------------------------------------------------

    def _incremental(self, delta: Delta, started: float, arrivals: list[float]) -> bool:
        try:
            if delta:
                self.backend.apply(delta)
        except Exception as exc:  # noqa: BLE001 - any failure: the kernel state is unknown, resync it all
            self._failed("incremental", exc)
            return False
        with self._lock:
            self._applied -= delta.delete
            self._applied |= delta.add
            self._count(delta.delete, -1)
            self._count(delta.add, +1)
        self._succeeded("incremental", started, arrivals, bool(delta))
        return True

    def _full(self, started: float, arrivals: list[float], *, periodic: bool) -> None:
        """``periodic``: a resync on schedule, any repair is drift. Otherwise, after a failed transaction, what
        ``ensure`` found in the kernel (``backend.last_seen``) is compared with what we last applied: if it
        differs, someone changed it, and that repair counts like a periodic one (e.g. a table deleted by hand
        makes the next incremental sync fail)."""
        check = not periodic and self._belief_ok
        with self._lock:
            desired = self.index.keys()
            applied = frozenset(self._applied)
            believed = applied if check else None
        try:
            if self._first_full and self.gate is not None and not self._inherited_read:
                # A restarted agent: what the kernel holds was served by Envoy when it was installed, and
                # Envoy keeps serving its last configuration; never take those redirects away to re-gate them.
                # Read once: when this first full sync fails later on, its retry keeps what was read here
                # (what the kernel held at the start) and reads the kernel only in ``ensure``.
                self._inherited = self.backend.read()
                self._inherited_read = True
            keys = desired if self.gate is None else frozenset(
                (desired & (applied | self._inherited)) | self._servable(desired - applied - self._inherited))
            keys = keys | (frozenset(self._held) & applied)  # handed-back keys stay until released
            # One kernel read: ``ensure`` reports what it found (the Backend contract's ``last_seen``).
            repaired = self.backend.ensure(keys)
            before = self.backend.last_seen if check else None
        except Exception as exc:  # noqa: BLE001
            self._belief_ok = False
            self._failed("full", exc)
            return
        drifted = periodic or before != believed
        with self._lock:
            self._applied = set(keys)
            self._counts = dict.fromkeys(self._counts, 0)
            self._count(keys, +1)
        self._belief_ok = True
        self._first_full = False
        if drifted and repaired:
            self.metrics.drift_repairs.inc()
            log.warning("resync repaired drift in the kernel rules", extra={"entries": len(keys)})
        self.status.full_sync_pending = False
        self._next_full = time.monotonic() + self.resync_period
        self._succeeded("full", started, arrivals, True)
        memory.settle("full sync")

    def _succeeded(self, kind: str, started: float, arrivals: list[float], wrote: bool) -> None:
        done = time.monotonic()
        elapsed = time.perf_counter() - started
        now = self._clock()
        for since in arrivals:
            latency = max(0.0, done - since)
            self.metrics.event_to_rule.observe(latency)
            self.latencies.append(latency)
        if wrote:
            self.metrics.sync_duration.labels(kind).observe(elapsed)
            self.status.transactions += 1
        self.metrics.last_sync.labels(kind).set(now)
        s = self.status
        if kind == "full":
            s.last_full_sync = now
        else:
            s.last_incremental_sync = now
        s.last_success, s.first_sync_done, s.last_error_time = now, True, None
        s.changes_applied += len(arrivals)
        self._retry_delay = self.retry_min
        self._update_gauges()
        if self.on_synced is not None and (self.tracker.marked or len(self._applied) != self._reported):
            self._reported = len(self._applied)
            self.on_synced()  # the Lease: Services prepared, and how many redirects are in (uninstall waits for 0)
        if kind == "full":
            log.info("full sync done", extra={"entries": len(self._applied), "seconds": round(elapsed, 4),
                                              "cpu_seconds": round(time.thread_time() - self._cpu_started, 4)})

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.metrics.sync_errors.labels(kind).inc()
        s = self.status
        s.full_sync_pending = True
        s.last_error, s.last_error_time = f"{kind} sync: {exc}", self._clock()
        self._retry_at = time.monotonic() + self._retry_delay
        log.error("sync failed: full sync scheduled", extra={"kind": kind, "error": str(exc)[:500],
                                                             "retry_in_s": round(self._retry_delay, 3)})
        self._retry_delay = min(self.retry_max, self._retry_delay * 2)

    def _count(self, keys: Any, sign: int) -> None:
        counts = self._counts
        for key in keys:
            counts["ipv4" if key.family == 4 else "ipv6", "address" if key.ip else "nodePort"] += sign

    def _update_gauges(self) -> None:
        with self._lock:
            counts = dict(self._counts)
            services, unserved, errors = len(self.index), self.index.unserved_count, self.index.error_count
        for (family, match), n in counts.items():
            self.metrics.entries.labels(family, match).set(n)
        self.metrics.services.set(services)
        self.metrics.unserved_ports.set(unserved)
        self.metrics.service_errors.set(errors)

    def _log_problems(self, sid: ServiceId, found: ServiceEntries) -> None:
        if found.unserved:
            log.warning("labelled Service has ports the proxy cannot serve (not TCP)",
                        extra={"service": sid, "ports": [f"{u.protocol}/{u.port}" for u in found.unserved]})
        if found.errors:
            log.warning("labelled Service has errors: those entries are skipped",
                        extra={"service": sid, "errors": list(found.errors)})


