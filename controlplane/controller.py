"""The control plane's imperative shell: watched Services and EndpointSlices -> the store -> Envoy, and
the gate that tells the kernel side which redirects Envoy serves.

- Sinks (``services``, ``slices``) project each object on arrival (``translate.project_service``,
  ``endpoints.project_slice``) and mark its Service dirty; nothing else happens on a watch thread.
- One worker (``run``) waits until both lists completed, then translates dirty Services in small batches
  (``translate.translate_service``), turns the specs that changed into protobuf and updates the store:
  clusters, endpoints, then the listener matcher entries. The store tells the streams what changed.
- The gate: a key is *servable* once the newest Envoy has ACKed its cluster, its endpoints, a listener
  version whose matcher sends the key to its chain, and (HTTP) the route configuration. ``on_gate`` hears
  the keys that may have become servable; the agent then installs their redirects.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from controlplane import endpoints as eps
from controlplane import envoystats
from controlplane import resources as res
from controlplane.metrics import ControlPlaneMetrics
from controlplane.server import AdsServer
from controlplane.store import Store
from controlplane.stream import Stream
from controlplane.translate import (
    NOTHING,
    Chain,
    ClusterSpec,
    LoadSpec,
    NodeInfo,
    ServiceResources,
    ServiceView,
    cluster_name,
    project_service,
    translate_service,
)
from redirector import memory
from redirector.blocks import Answers
from redirector.desired import parse_ip, service_id
from redirector.model import Family, Key
from shared import constants as c
from shared.batching import wait_for_quiet

log = logging.getLogger(__name__)
Mangle = Callable[[str, Message], None]  # test hook: (type_url, message) -> corrupt it in place
GateListener = Callable[[set[Key]], None]
LISTENER_VERSIONS_KEPT = 8
# With eager clusters, a warning (once) from this many clusters on: ~32 KiB of Envoy each, so ~250 MiB, half the
# shipped proxy's memory limit (docs/controlplane.md, "Limits").
EAGER_CLUSTERS_WARNING = 8_000
ANSWERS_RESYNC = 30.0  # seconds between deliveries of unchanged kernel answers (drift checks, see below)
ENVOY_BYTES_PER_CLUSTER = 32 * 1024
UNBLOCK_HOLD = 2.0  # seconds a key with new endpoints stays blocked at most, waiting for Envoy's ACK
BIG_BATCH = 1000  # Services translated in one batch, after which the freed heap is handed back (redirector.memory)


def _winner(claimants: Iterable[str]) -> str:
    """The Service that gets a contested key: the smallest (namespace, name), as ``redirector.desired``'s index
    decides for the kernel (plain "namespace/name" order differs: "a-b/x" < "a/x")."""
    return min(claimants, key=lambda sid: sid.partition("/")[::2])


@dataclass
class _Pending:
    dirty: set[str] = field(default_factory=set)
    since: dict[str, float] = field(default_factory=dict)  # sid -> first pending change (monotonic)


def _swap(into: dict[Key, Any], old: Iterable[tuple[Key, Any]], new: Iterable[tuple[Key, Any]]) -> None:
    """One Service's entries in a node-wide map (its kernel verdicts, its source ranges): old out, new in."""
    for key, _ in old:
        into.pop(key, None)
    into.update(new)

class ControlPlane:
    """Feeds the store from Services and EndpointSlices of this node's cluster; answers the gate."""

    def __init__(self, node: NodeInfo, *, proxy_port: int = c.DEFAULT_PROXY_PORT,
                 proxy_name: str = c.DEFAULT_PROXY_NAME, metrics: ControlPlaneMetrics | None = None,
                 mangle: Mangle | None = None, batch_idle: float = 0.002, batch_max: float = 0.02,
                 envoy_admin: tuple[str, int] | envoystats.Admins | None = ("127.0.0.1", c.ENVOY_ADMIN_PORT),
                 on_demand: bool = False, transparent: tuple[int, int] | None = None) -> None:
        """``on_demand``: Envoy fetches a key's cluster when a connection first needs it instead of holding
        every cluster (``--envoy-clusters on-demand``; the AdsServer must be built with the same flag).
        ``transparent``: (port, socket mark) of the transparent listener that keeps the client's source
        address for externalTrafficPolicy Local traffic (``--preserve-source-ip``); None: no such listener."""
        self.node = node
        self.on_demand = on_demand
        self.proxy_name = proxy_name
        self.store = Store()
        self.metrics = metrics or ControlPlaneMetrics()
        self.mangle = mangle
        self.batch_idle, self.batch_max = batch_idle, batch_max
        self.families: tuple[Family, ...] = (4, 6) if node.ipv6 else (4,)
        self.listeners = {f: res.ListenerBuilder(f, proxy_port, on_demand=on_demand) for f in self.families}
        # The transparent listeners hold only the externalTrafficPolicy Local Services' external keys, which
        # ALSO stay on the main listener: the kernel sends a key to the transparent one (an overlay in the
        # agent's block table) only once Envoy serves it there, and falls back to the main one otherwise.
        self.transparent_listeners: dict[Family, res.ListenerBuilder] = {} if transparent is None else {
            f: res.ListenerBuilder(f, transparent[0], on_demand=on_demand, transparent_mark=transparent[1])
            for f in self.families}
        self.routes = {f: res.RouteBuilder(f) for f in self.families}
        self.envoy_stats = envoystats.EnvoyStats(envoy_admin) if envoy_admin is not None else None
        # listener name -> its versions (newest last) -> the keys that version routes
        self._listener_keys: dict[str, OrderedDict[str, frozenset[Key]]] = {
            res.listener_name(f, t): OrderedDict() for f in self.families for t in (False, True)}
        self.services = ServiceSink(self)
        self.slices = SliceSink(self)
        self.nodes = NodeSink(self)
        self.server: AdsServer | None = None
        self.on_gate: GateListener | None = None
        # Keys of labelled Services with no endpoint to send to -> "reject" | "drop" (kube-proxy's answer);
        # ``on_blocked`` hears the whole map after each change (redirector.blocks programs the kernel).
        self.blocked: dict[Key, str] = {}
        # With it, the labelled Services' ClusterIP keys (``ServiceResources.exposed``): their other ports
        # are rejected in the kernel.
        self.exposed: set[Key] = set()
        # and the labelled load balancers' source ranges (``ServiceResources.firewall``).
        self.firewall: dict[Key, tuple[str, ...]] = {}
        # and per labelled Service its keys for the transparent listener (``ServiceResources.transparent``),
        # of which the kernel sends those the transparent listener serves there.
        self._transparent: dict[str, tuple[tuple[Key, tuple[str, ...]], ...]] = {}
        self._overlay_names: frozenset[str] = frozenset()  # their cluster names (what an ACK names)
        self._warned_clusters = False
        # The kernel fallback carries migrated Services (Envoy down): nothing goes to the transparent listener,
        # whose port nobody answers (on the iptables backend the fallback's chains come after our overlay).
        self.proxy_down = False
        self._answers_at = time.monotonic()
        self._delivered: Answers | None = None  # what the kernel writer was last handed
        self.on_blocked: Callable[[Answers], None] | None = None
        # Keys that just got their first usable endpoint stay blocked (key -> (verdict, deadline)) until the
        # connected Envoy ACKs the endpoints that serve them: unblocked earlier, a new connection would
        # reach an Envoy with no endpoint and be closed after it was accepted (docs/conformance.md row 3).
        # At most ``unblock_hold`` seconds (no ACK, a refusal, Envoy gone: never hold a key for good).
        self._unblocking: dict[Key, tuple[str, float]] = {}
        self._unblock_lock = threading.Lock()  # a leaf: nothing else is taken under it
        self._blocks_due = False  # an ACK released held keys: the worker delivers the blocks again
        self.unblock_hold = UNBLOCK_HOLD
        # healthCheckNodePort -> (Service, local endpoints), for the node's health-check server.
        self.health: dict[int, tuple[str, int]] = {}
        self.on_health: Callable[[dict[int, tuple[str, int]]], None] | None = None
        self._cond = threading.Condition()
        self._pending = _Pending()
        self._stop = threading.Event()
        self.services_listed = threading.Event()
        self.slices_listed = threading.Event()
        self.first_push_done = threading.Event()
        # Worker state (the worker thread only; readers copy under ``_lock``).
        self._lock = threading.Lock()
        self._views: dict[str, ServiceView] = {}
        self._slices: dict[str, dict[str, eps.SliceView]] = {}  # service -> slice id -> view
        self._slice_owner: dict[str, str] = {}  # slice id -> service
        self._published: dict[str, ServiceResources] = {}
        # cluster name -> Services claiming it: a tuple (one Service nearly always; a 1-set costs 4x as much)
        self._claimants: dict[str, tuple[str, ...]] = {}
        self._keys: dict[str, Key] = {}  # cluster name -> key
        self._retake: set[str] = set()  # claimants of a key whose owner left: republished in full, not diffed
        self.push_latencies: deque[float] = deque(maxlen=4096)  # change arrival -> pushed to the store
        self._last_last_event = 0.0

    # -- watch side ---------------------------------------------------------------------------------------

    def mark(self, sids: Iterable[str]) -> None:
        now = time.monotonic()
        with self._cond:
            for sid in sids:
                self._pending.dirty.add(sid)
                self._pending.since.setdefault(sid, now)
            self._last_last_event = now
            self._cond.notify_all()

    # -- the worker -----------------------------------------------------------------------------------------

    def attach(self, server: AdsServer) -> None:
        self.server = server

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def run(self) -> None:
        """Until ``stop()``: translate what changed and update the store."""
        self._publish_static()
        while not (self.services_listed.is_set() and self.slices_listed.is_set()):
            if self._stop.wait(0.05):
                return
        listed = time.monotonic()
        self.mark(())  # the first push happens even for an empty cluster (readiness waits for it)
        with self._cond:
            self._pending.dirty.add("")
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._pending.dirty:
                    if self._blocks_due or self._expire_holds() or self._answers_resync_due():
                        break
                    self._cond.wait(min(1.0, self.unblock_hold) if self._unblocking else 1.0)
                if self._stop.is_set():
                    return
                redeliver = not self._pending.dirty
            if redeliver:  # only held keys were released: no translation to do
                self._blocks_due = False
                self._deliver_blocks()
                continue
            with self._cond:
                wait_for_quiet(self._cond, lambda: self._last_last_event, self.batch_idle, self.batch_max,
                               self._stop.is_set)
                batch, self._pending = self._pending, _Pending()
            try:
                self.sync(batch.dirty)
            except Exception:  # noqa: BLE001 - never let one bad batch stop the control plane
                log.exception("control plane sync failed: those Services are retried", extra={"services": len(batch.dirty)})
                self.metrics.sync_errors.inc()
                self.mark(batch.dirty)
                self._stop.wait(0.5)
                continue
            done = time.monotonic()
            for since in batch.since.values():
                self.push_latencies.append(done - since)
                self.metrics.change_to_store.observe(done - since)
            if not self.first_push_done.is_set():
                # The kernel's answers once in full, even when nothing changed: a previous agent's table (keys
                # it blocked or sent to a transparent listener this configuration lacks) is rewritten now.
                self._deliver_blocks()
                log.info("first translation in the store: Envoy is answered from now on",
                         extra={"services": len(self._views), "translated": len(self._published),
                                "seconds_after_lists": round(done - listed, 3)})
            self.first_push_done.set()
            if "" in batch.dirty or len(batch.dirty) >= BIG_BATCH:  # after readiness: a heap walk takes ms
                # Its garbage is tens of MiB at 10,000 Services. Not memory.settle: its full collection here
                # held the GIL ~150 ms just as Envoy's first answer was due (measured: 7.16 -> 7.31 s).
                memory.release_freed("translation")

    def _publish_static(self) -> None:
        """The route configurations exist from the start (Envoy's HTTP chains wait for them)."""
        self._publish_routes(set(self.families))

    def _publish_routes(self, families: Iterable[Family]) -> None:
        upserts = {}
        for family in families:
            upserts[res.route_name(family)] = res.serialize(self.routes[family].config)
        self.store.update(res.ROUTE, upserts)

    def sync(self, sids: Iterable[str]) -> None:
        """Translate ``sids`` and push what changed (also called directly by tests and benchmarks)."""
        started = time.perf_counter()
        clusters: dict[str, bytes] = {}
        loads: dict[str, bytes] = {}
        cluster_removes: set[str] = set()
        load_removes: set[str] = set()
        touched: set[tuple[Family, bool]] = set()  # (family, transparent listener)
        routed: set[Family] = set()
        again: set[str] = set()
        blocks_changed = False
        server = self.server
        hold = not self.on_demand and server is not None and server.newest() is not None  # an ACK can come
        health_changed = False
        with self._lock:
            for sid in sids:
                view = self._views.get(sid)
                slices = self._slices.get(sid, {}).values()
                new = translate_service(view, slices, self.node) if view is not None else NOTHING
                old = self._published.get(sid, NOTHING)
                if new == old and sid not in self._retake:
                    continue
                self._apply(sid, old, new, clusters, loads, cluster_removes, load_removes, touched, routed, again)
                if old.health != new.health:
                    if old.health is not None:
                        self.health.pop(old.health[0], None)
                    if new.health is not None:
                        self.health[new.health[0]] = (sid, new.health[1])
                    health_changed = True
                if old.blocked != new.blocked:
                    _swap(self.blocked, old.blocked, new.blocked)
                    # Only a labelled Service's keys that Envoy still serves wait (not a Service handed back
                    # to kube-proxy, whose keys must be left to it at once).
                    self._hold_unblocked(old.blocked, new.blocked, hold and view is not None and view.labelled,
                                         {key for key, _chain in new.chains})
                    blocks_changed = True
                if old.exposed != new.exposed:
                    self.exposed.difference_update(old.exposed)
                    self.exposed.update(new.exposed)
                    blocks_changed = True
                if old.firewall != new.firewall:
                    _swap(self.firewall, old.firewall, new.firewall)
                    blocks_changed = True
                if self.transparent_listeners:
                    overlay = new.transparent if view is not None and view.labelled else ()
                    if overlay != self._transparent.get(sid, ()):
                        if overlay:
                            self._transparent[sid] = overlay
                        else:
                            self._transparent.pop(sid, None)
                        self._overlay_names = frozenset(
                            cluster_name(key) for pairs in self._transparent.values() for key, _ips in pairs)
                        blocks_changed = True
                if new is NOTHING or (not new.clusters and not new.problems):
                    self._published.pop(sid, None)
                else:
                    self._published[sid] = new
        delivered = self._delivered
        if blocks_changed and delivered is not None and delivered.transparent:
            # Keys leaving the transparent listener leave the kernel overlay first, before the listener without
            # them is published (new connections would reach a listener with no chain for them). Only that:
            # everything else the kernel answers follows the store, as before (an unblocked key must find its
            # endpoints in the store).
            with self._lock:
                still = {key for pairs in self._transparent.values() for key, _ips in pairs}
            if not still >= delivered.transparent.keys():
                self._deliver(delivered._replace(transparent={k: v for k, v in delivered.transparent.items() if k in still}))
        # Order matters to Envoy: clusters and their endpoints before the listener that routes to them.
        self.store.update(res.CLUSTER, clusters)
        self.store.update(res.ENDPOINT, loads)
        # Routes before listeners: a new key's explicit route names its cluster, which is already in the store.
        self._publish_routes(sorted(routed))
        for family, transparent in sorted(touched):
            builder = (self.transparent_listeners if transparent else self.listeners)[family]
            listener = builder.listener
            if self.mangle is not None:
                self.mangle(res.LISTENER, listener)
            data = res.serialize(listener)
            version = res.version_of(data)
            name = res.listener_name(family, transparent)
            kept = self._listener_keys[name]
            kept[version] = frozenset(builder.keys)
            while len(kept) > LISTENER_VERSIONS_KEPT:
                kept.popitem(last=False)
            self.store.update(res.LISTENER, {name: data})
        # Removals last (the streams also hold a cluster removal until the listener no longer names it).
        self.store.update(res.ENDPOINT, removes=load_removes)
        self.store.update(res.CLUSTER, removes=cluster_removes)
        if blocks_changed:
            self._deliver_blocks()
        if self.on_demand and self.on_gate is not None and (clusters or loads):
            # No ACK will come for a cluster Envoy has not asked for: the store having it is what changed.
            self.on_gate({k for k in (self._keys.get(n) for n in (*clusters, *loads)) if k is not None})
        self._count_clusters()
        if health_changed and self.on_health is not None:
            self.on_health(dict(self.health))
        self.metrics.sync_duration.observe(time.perf_counter() - started)
        if again:
            self.mark(again)

    def _apply(self, sid: str, old: ServiceResources, new: ServiceResources, clusters: dict[str, bytes],
               loads: dict[str, bytes], cluster_removes: set[str], load_removes: set[str],
               touched: set[tuple[Family, bool]], routed: set[Family], again: set[str]) -> None:
        retake = sid in self._retake  # what it published lost to another Service: the store holds that one's
        self._retake.discard(sid)
        old_clusters = {s.name: s for s in old.clusters}
        old_loads = {s.name: s for s in old.loads}
        new_clusters = {s.name: s for s in new.clusters}
        new_loads = {s.name: s for s in new.loads}
        new_chains = dict(new.chains)
        new_routes = dict(new.routes)
        new_transparent = frozenset(key for key, _ips in new.transparent)
        for key, _chain in old.chains:
            name = cluster_name(key)
            if key in new_chains:
                continue
            claimants = self._claimants.get(name, ())
            was_owner = bool(claimants) and _winner(claimants) == sid
            claimants = tuple(c for c in claimants if c != sid)
            if claimants:
                self._claimants[name] = claimants
                if was_owner:
                    again.update(claimants)  # the next claimant takes the key over
                    self._retake.update(claimants)
            else:
                self._claimants.pop(name, None)
                self._keys.pop(name, None)
                self.listeners[key.family].remove(key)
                touched.add((key.family, False))
                self._set_transparent(key, None, touched)
                if self.routes[key.family].remove(name):
                    routed.add(key.family)
                cluster_removes.add(name)
                load_removes.add(name)
        for key, chain in new.chains:
            name = cluster_name(key)
            claimants = self._claimants.get(name, ())
            if sid not in claimants:
                claimants = self._claimants[name] = (*claimants, sid)
            if _winner(claimants) != sid:
                continue  # another Service claims this key and wins (the kernel index decides the same way)
            self._keys[name] = key
            if self.listeners[key.family].keys.get(key) != chain:
                self.listeners[key.family].set(key, chain)
                touched.add((key.family, False))
            self._set_transparent(key, chain if key in new_transparent else None, touched)
            options = new_routes.get(key)
            routes = self.routes[key.family]
            if routes.set(name, options) if options is not None else routes.remove(name):
                routed.add(key.family)
            cspec, lspec = new_clusters[name], new_loads[name]
            if retake or old_clusters.get(name) != cspec or name in cluster_removes:
                clusters[name] = self._bytes(res.CLUSTER, res.cluster(cspec))
            if retake or old_loads.get(name) != lspec or name in load_removes:
                loads[name] = self._bytes(res.ENDPOINT, res.load_assignment(lspec))
            cluster_removes.discard(name)
            load_removes.discard(name)

    def _answers_resync_due(self) -> bool:
        """Every ``ANSWERS_RESYNC`` s the kernel answers are delivered again, so their writer can check what
        others may have removed under it (KernelBlocks: the transparent listener's reply route)."""
        now = time.monotonic()
        if self.on_blocked is None or now - self._answers_at < ANSWERS_RESYNC:
            return False
        self._answers_at = now
        return True

    def _count_clusters(self) -> None:
        count = self.store.count(res.CLUSTER)
        self.metrics.clusters.set(count)
        if not self.on_demand and count >= EAGER_CLUSTERS_WARNING and not self._warned_clusters:
            self._warned_clusters = True
            log.warning("many eager Envoy clusters: Envoy needs about this much memory for them; above the proxy's "
                        "limit it is OOM-killed. Consider --envoy-clusters on-demand (docs/install.md)",
                        extra={"clusters": count, "envoy_mib": count * ENVOY_BYTES_PER_CLUSTER // 2**20})

    def _set_transparent(self, key: Key, chain: Chain | None, touched: set[tuple[Family, bool]]) -> None:
        """Under ``_lock``: route ``key`` on the transparent listener with ``chain``, or not (None)."""
        builder = self.transparent_listeners.get(key.family)
        if builder is None or builder.keys.get(key) == chain:
            return
        if chain is None:
            builder.remove(key)
        else:
            builder.set(key, chain)
        touched.add((key.family, True))

    def _hold_unblocked(self, old: Iterable[tuple[Key, str]], new: Iterable[tuple[Key, str]], hold: bool,
                        served: set[Key]) -> None:
        """Under ``_lock``: keys leaving the blocked map that Envoy now ``served`` wait for its ACK of their
        endpoints (``hold``: eager clusters, a connected Envoy, a labelled Service; on demand, Envoy fetches
        the endpoints on the first connection, so there is nothing to wait for)."""
        still = {key for key, _ in new}
        deadline = time.monotonic() + self.unblock_hold
        with self._unblock_lock:
            for key in still:
                self._unblocking.pop(key, None)
            if hold:
                for key, verdict in old:
                    if key not in still and key in served:
                        self._unblocking[key] = (verdict, deadline)

    def _deliver_blocks(self) -> None:
        """The kernel's answers as they stand, held keys included (``on_blocked`` hears the whole map)."""
        if self.on_blocked is None:
            return
        with self._lock:
            blocked, exposed, firewall = dict(self.blocked), frozenset(self.exposed), dict(self.firewall)
            overlay: dict[Key, tuple[str, ...]] = {}
            for sid, pairs in self._transparent.items():
                for key, ips in pairs:  # a contested key (a shared external IP): its winner's endpoints
                    claimants = self._claimants.get(cluster_name(key), ())
                    if claimants and _winner(claimants) == sid:
                        overlay[key] = ips
            with self._unblock_lock:
                for key, (verdict, _deadline) in self._unblocking.items():
                    blocked.setdefault(key, verdict)
        served = self.transparent_servable(overlay)
        self._deliver(Answers(blocked, exposed, firewall, {key: ips for key, ips in overlay.items() if key in served},
                              self.node.pod_cidrs if served else ()))

    def _deliver(self, answers: Answers) -> None:
        """Hand ``answers`` to the kernel writer; its failure is logged and retried (the 30 s redelivery, the
        next change), never a reason to drop the translation already published."""
        if self.on_blocked is None:
            return
        self._delivered = answers
        try:
            self.on_blocked(answers)
        except Exception:  # noqa: BLE001 - the writer's own bug or the kernel's: logged, retried
            log.exception("could not hand the kernel its answers: retried at the next delivery")

    def _expire_holds(self) -> bool:
        """Release the held keys whose wait is over; True when some were (the blocks are delivered again)."""
        if not self._unblocking:
            return False
        now = time.monotonic()
        with self._unblock_lock:
            over = [key for key, (_verdict, deadline) in self._unblocking.items() if deadline <= now]
            for key in over:
                del self._unblocking[key]
        if over:
            log.warning("Envoy did not confirm the endpoints of a Service's keys in time: unblocked anyway",
                        extra={"keys": [str(k) for k in over[:10]], "seconds": self.unblock_hold})
        return bool(over)

    def _release_acked(self, versions: Mapping[str, str | None]) -> None:
        """From an EDS ACK of the newest Envoy: held keys whose endpoints it now holds are released."""
        released = False
        with self._unblock_lock:
            for name, version in versions.items():
                key = self._keys.get(name)
                if key is None or key not in self._unblocking or version is None:
                    continue
                current = self.store.get(res.ENDPOINT, name)
                if current is not None and current.version == version:
                    del self._unblocking[key]
                    released = True
        if released:
            self._blocks_due = True
            with self._cond:
                self._cond.notify_all()

    def _bytes(self, type_url: str, message: Message) -> bytes:
        if self.mangle is not None:
            self.mangle(type_url, message)
        return res.serialize(message)

    # -- the gate --------------------------------------------------------------------------------------------

    def servable(self, keys: Iterable[Key]) -> set[Key]:
        """The keys the newest Envoy serves (see the module docstring)."""
        server = self.server
        if server is None:
            return set()
        with server.cond:
            stream = server.newest()
            if stream is None:
                return set()
            return self._servable(stream, keys)

    def _servable(self, stream: Stream, keys: Iterable[Key]) -> set[Key]:
        cds, eds = stream.types[res.CLUSTER].acked, stream.types[res.ENDPOINT].acked
        lds, rds = stream.types[res.LISTENER].acked, stream.types[res.ROUTE].acked
        held = self._held(lds, transparent=False)
        ok: set[Key] = set()
        for key in keys:
            if key not in held.get(key.family, ()):
                continue
            name = cluster_name(key)
            if self.on_demand:  # Envoy fetches the cluster on first use: it must exist and not be refused
                cluster = self.store.get(res.CLUSTER, name)
                if cluster is None or self.store.get(res.ENDPOINT, name) is None:
                    continue
                if stream.types[res.CLUSTER].nacked.get(name, ("",))[0] == cluster.version:
                    continue
            elif name not in cds or name not in eds:
                continue
            if self.listeners[key.family].keys.get(key) == "http" and res.route_name(key.family) not in rds:
                continue
            ok.add(key)
        return ok

    def _held(self, lds: dict[str, str], transparent: bool) -> dict[Family, frozenset[Key]]:
        """Per family, the keys the listener version Envoy ACKed routes."""
        held: dict[Family, frozenset[Key]] = {}
        for family in self.families:
            name = res.listener_name(family, transparent)
            version = lds.get(name)
            held[family] = self._listener_keys[name].get(version, frozenset()) if version else frozenset()
        return held

    def set_proxy_down(self, down: bool) -> None:
        """From the kernel fallback's watchdog, right after it switched: Envoy is down (True) or serving again
        (False). Going down, the overlay is withdrawn here and now (on the iptables backend it precedes the
        fallback's chains: until then its keys would reach the dead transparent port); the worker delivers
        again too, in case its own delivery raced this one."""
        if down == self.proxy_down:
            return
        self.proxy_down = down
        if self._transparent:
            if down:
                self._deliver_blocks()
            self._blocks_due = True
            with self._cond:
                self._cond.notify_all()

    def transparent_servable(self, keys: Iterable[Key]) -> set[Key]:
        """The keys the kernel may send to the transparent listener: the newest Envoy serves them on the
        main listener (the gate) AND routes them on the transparent one at the version it ACKed, and the
        kernel fallback is not carrying the node's Services (Envoy down)."""
        server, keys = self.server, list(keys)
        if server is None or not keys or not self.transparent_listeners or self.proxy_down:
            return set()
        with server.cond:
            stream = server.newest()
            if stream is None:
                return set()
            held = self._held(stream.types[res.LISTENER].acked, transparent=True)
            return {k for k in self._servable(stream, keys) if k in held.get(k.family, ())}

    def acked(self, stream: Stream, type_url: str, versions: dict[str, str | None]) -> None:
        """From the xDS server (under its lock): tell the agent which keys may have become servable."""
        self.metrics.acks.labels(res.SHORT[type_url]).inc()
        if self.server is None or stream is not self.server.newest():
            return
        if type_url == res.ENDPOINT and self._unblocking:
            self._release_acked(versions)
        if self._transparent and self._concerns_overlay(type_url, versions):
            self._blocks_due = True  # the kernel's transparent overlay follows what Envoy serves (_deliver_blocks)
            with self._cond:
                self._cond.notify_all()
        if self.on_gate is None:
            return
        candidates: set[Key] = set()
        if type_url in (res.CLUSTER, res.ENDPOINT):
            candidates = {k for k in (self._keys.get(n) for n in versions) if k is not None}
        elif type_url == res.LISTENER:
            for name, version in versions.items():
                if name in self._listener_keys and version:
                    candidates |= self._listener_keys[name].get(version, frozenset())
        elif type_url == res.ROUTE:
            candidates = {k for f in self.families for k, chain in self.listeners[f].keys.items() if chain == "http"}
        if candidates:
            self.on_gate(candidates)

    def _concerns_overlay(self, type_url: str, versions: Mapping[str, str | None]) -> bool:
        """Could this ACK change what the transparent overlay holds? Listeners and routes: yes; clusters and
        endpoints: when they are a transparent key's (an ACK of 20,000 endpoints elsewhere must not make the
        worker re-read every kernel answer)."""
        if type_url in (res.LISTENER, res.ROUTE):
            return True
        overlay = self._overlay_names
        return any(name in overlay for name in versions)

    def nacked(self, stream: Stream, type_url: str, names: list[str], message: str) -> None:
        """Envoy refused a response: count it and say which Services it concerns (they stay un-redirected)."""
        self.metrics.nacks.labels(res.SHORT[type_url]).inc()
        services = sorted({sid for n in names for sid in self._claimants.get(n, ())})
        log.warning("Envoy refused a configuration: the Services concerned stay with their last served state",
                    extra={"type": res.SHORT[type_url], "resources": names[:20], "services": services[:20],
                           "error": message[:500]})

    def pushed(self, type_url: str, updated: int, removed: int) -> None:
        self.metrics.pushes.labels(res.SHORT[type_url]).inc()
        self.metrics.pushed_resources.labels(res.SHORT[type_url]).inc(updated + removed)

    # -- facts -----------------------------------------------------------------------------------------------

    def endpoints_for(self, keys: Iterable[Key]) -> dict[Key, tuple[tuple[str, int], ...]]:
        """The endpoints each key's cluster sends new connections to (the kernel fallback uses them while
        Envoy is down); keys without endpoints are left out (the kernel rejects or drops those already)."""
        wanted = {cluster_name(k): k for k in keys}
        out: dict[Key, tuple[tuple[str, int], ...]] = {}
        with self._lock:
            for found in self._published.values():
                for load in found.loads:
                    key = wanted.get(load.name)
                    if key is not None and load.endpoints:
                        out[key] = load.endpoints
        return out

    def in_sync(self) -> bool:
        """The newest Envoy confirmed the current version of everything (refused resources aside)."""
        server = self.server
        if server is None or not self.first_push_done.is_set():
            return False
        with server.cond:
            stream = server.newest()
            return stream is not None and stream.in_sync()

    def traffic_source(self, cached: bool = True) -> tuple[dict[str, int] | None, list[tuple[str, list[str]]]]:
        """For the per-Service metrics (controlplane.servicemetrics): Envoy's counters and, in name order,
        the served Services Envoy counted traffic for, with those clusters' stat names (never a walk over
        every Service: ``servicemetrics.used_services`` says why)."""
        counters = self.envoy_stats.snapshot(cached)[0] if self.envoy_stats is not None else None
        if counters is None:
            return None, []
        used = envoystats.used_services(counters)  # outside the lock: parsing Envoy's answer
        with self._lock:
            return counters, [(sid, names) for sid, names in used if sid in self._published]

    def report(self, limit: int = 200, service: str | None = None) -> dict[str, Any]:
        """Per Service what Envoy holds (/debug/proxy), with Envoy's traffic counters per key."""
        server = self.server
        counters: tuple[dict[str, int] | None, str] = (None, "no Envoy admin address")
        if self.envoy_stats is not None:
            counters = self.envoy_stats.snapshot()  # outside every lock: an HTTP request to Envoy's admin
        with self._lock:
            published = dict(self._published) if service is None else (
                {service: self._published[service]} if service in self._published else {})
            views = len(self._views)
        stream = server.newest() if server is not None else None
        rows: list[dict[str, Any]] = []
        cond = server.cond if server is not None else threading.RLock()
        with cond:
            for sid in sorted(published)[:limit]:
                found = published[sid]
                rows.append(self._row(sid, found, stream, counters))
            streams = server.summaries() if server is not None else []
            closed = list(server.closed) if server is not None else []
        return {"node": self.node.name, "envoy_clusters": "on-demand" if self.on_demand else "eager",
                "services_known": views, "services_served": len(published),
                "listed": self.services_listed.is_set() and self.slices_listed.is_set(),
                "in_sync": self.in_sync(), "revision": self.store.revision,
                "streams": streams, "ended_streams": closed, "services": rows,
                "truncated": len(published) > limit}

    def _row(self, sid: str, found: ServiceResources, stream: Stream | None,
             counters: tuple[dict[str, int] | None, str] = (None, "not asked")) -> dict[str, Any]:
        clusters = []
        traffic = envoystats.per_key(*counters, [s.stat_name for s in found.clusters])
        served = self._servable(stream, [k for k, _ in found.chains]) if stream is not None else set()
        kept: set[Key] | None = None  # --preserve-source-ip: the keys the kernel was last told to send there
        if self.transparent_listeners:
            delivered = self._delivered
            kept = set(delivered.transparent) if delivered is not None else set()
        for (key, chain), load, figures in zip(found.chains, found.loads, traffic, strict=True):
            name = cluster_name(key)
            current = self.store.get(res.CLUSTER, name)
            refused = None
            if stream is not None:
                for type_url in (res.CLUSTER, res.ENDPOINT):
                    bad = stream.types[type_url].nacked.get(name)
                    if bad is not None:
                        refused = bad[1][:300]
            clusters.append({"key": str(key), "cluster": name, "chain": chain, "endpoints": len(load.endpoints),
                             "version": current.version if current else None,
                             "acked": stream is not None and current is not None
                             and stream.types[res.CLUSTER].acked.get(name) == current.version,
                             "served": key in served, "refused": refused, "traffic": figures,
                             **({"client_address": "kept" if key in kept else "node"} if kept is not None else {})})
        return {"service": sid, "keys": clusters, "problems": list(found.problems)}


class ServiceSink:
    """``shared.kube.WatchSink`` for Services."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        views = {}
        for item in items:
            view = project_service(item, self.plane.proxy_name)
            views[view.sid] = view
        plane = self.plane
        with plane._lock:
            gone = set(plane._views) - set(views)
            plane._views = views
        plane.mark(set(views) | gone)
        plane.services_listed.set()

    def upsert(self, obj: dict[str, Any]) -> None:
        view = project_service(obj, self.plane.proxy_name)
        with self.plane._lock:
            if self.plane._views.get(view.sid) == view:
                return
            self.plane._views[view.sid] = view
        self.plane.mark((view.sid,))

    def delete(self, obj: dict[str, Any]) -> None:
        sid = service_id(obj)
        with self.plane._lock:
            self.plane._views.pop(sid, None)
        self.plane.mark((sid,))

    def restarted(self, reason: str) -> None:
        self.plane.metrics.watch_restarts.labels("services", reason).inc()


ZONE_LABEL = "topology.kubernetes.io/zone"


def node_ips(obj: Mapping[str, Any] | None) -> tuple[str, ...]:
    """kube-proxy's node IPs from a Node: per family, the first InternalIP, else the first ExternalIP (pure;
    anything unparsable is skipped)."""
    found: dict[int, dict[str, str]] = {4: {}, 6: {}}
    addresses = ((obj or {}).get("status") or {}).get("addresses")
    for item in addresses if isinstance(addresses, list) else []:
        kind, value = (item.get("type"), item.get("address")) if isinstance(item, Mapping) else (None, None)
        if kind not in ("InternalIP", "ExternalIP") or not isinstance(value, str):
            continue
        parsed = parse_ip(value)
        if parsed is not None:
            found[parsed[0]].setdefault(kind, parsed[1])
    return tuple(ip for f in (found[4], found[6]) if (ip := f.get("InternalIP") or f.get("ExternalIP")))


def pod_cidrs(obj: Mapping[str, Any] | None) -> tuple[str, ...]:
    """A Node's spec.podCIDRs (else spec.podCIDR), canonical networks; anything unparsable is skipped (pure)."""
    spec = (obj or {}).get("spec") or {}
    values = spec.get("podCIDRs") if isinstance(spec, Mapping) else None
    if not isinstance(values, list):
        values = [spec.get("podCIDR")] if isinstance(spec, Mapping) else []
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            continue
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except (TypeError, ValueError):
            continue
    return tuple(sorted(set(out)))


class NodeSink:
    """``shared.kube.WatchSink`` for this node's Node object: its zone decides topology-hint routing, so a
    zone change re-translates every Service (rare: a node's zone label is set when it joins)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def _zone(self, obj: dict[str, Any] | None) -> None:
        """The zone label, the primary address per family and the pod CIDRs of this node's Node object."""
        labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
        zone = labels.get(ZONE_LABEL) if isinstance(labels, dict) else None
        zone = zone if isinstance(zone, str) and zone else None
        ips = node_ips(obj)
        cidrs = pod_cidrs(obj)
        plane = self.plane
        with plane._lock:
            old = plane.node
            if old.zone == zone and old.ips == ips and old.pod_cidrs == cidrs:
                return
            plane.node = NodeInfo(old.name, ipv6=old.ipv6, zone=zone, ips=ips, pod_cidrs=cidrs)
            everyone = set(plane._views) if (old.zone, old.ips) != (zone, ips) else set()
        if cidrs != old.pod_cidrs:
            plane._blocks_due = True  # the kernel's transparent exemption (no translation depends on it)
            with plane._cond:
                plane._cond.notify_all()
        if everyone:
            log.info("node zone or addresses changed: re-translating every Service",
                     extra={"zone": zone, "ips": list(ips), "services": len(everyone)})
            plane.mark(everyone)

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        mine = [i for i in items if (i.get("metadata") or {}).get("name") == self.plane.node.name]
        self._zone(mine[0] if mine else None)

    def upsert(self, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") == self.plane.node.name:
            self._zone(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        return  # a deleted Node takes its pods with it; the zone we knew is as good as any

    def restarted(self, reason: str) -> None:
        self.plane.metrics.watch_restarts.labels("node", reason).inc()


class SliceSink:
    """``shared.kube.WatchSink`` for EndpointSlices."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        by_service: dict[str, dict[str, eps.SliceView]] = {}
        owner: dict[str, str] = {}
        for item in items:
            view = eps.project_slice(item)
            if view is not None:
                by_service.setdefault(view.service, {})[view.name] = view
                owner[view.name] = view.service
        plane = self.plane
        with plane._lock:
            changed = {s for s in set(by_service) | set(plane._slices) if by_service.get(s) != plane._slices.get(s)}
            plane._slices, plane._slice_owner = by_service, owner
        plane.mark(changed)
        plane.slices_listed.set()

    def upsert(self, obj: dict[str, Any]) -> None:
        view = eps.project_slice(obj)
        name = eps.slice_id(obj)
        plane = self.plane
        with plane._lock:
            dirty = self._drop(name)
            if view is not None:
                plane._slices.setdefault(view.service, {})[name] = view
                plane._slice_owner[name] = view.service
                dirty.add(view.service)
        plane.mark(dirty)

    def delete(self, obj: dict[str, Any]) -> None:
        with self.plane._lock:
            dirty = self._drop(eps.slice_id(obj))
        self.plane.mark(dirty)

    def _drop(self, name: str) -> set[str]:
        plane = self.plane
        service = plane._slice_owner.pop(name, None)
        if service is None:
            return set()
        slices = plane._slices.get(service, {})
        slices.pop(name, None)
        if not slices:
            plane._slices.pop(service, None)
        return {service}

    def restarted(self, reason: str) -> None:
        self.plane.metrics.watch_restarts.labels("endpointslices", reason).inc()


__all__ = ["ClusterSpec", "ControlPlane", "LoadSpec", "Chain"]
