"""One Envoy's Delta ADS stream: what it has, what is in flight, what it refused. No I/O, no gRPC.

The protocol (Envoy's xDS docs, "incremental xDS"), per resource type:

- at most one response in flight; a request whose ``response_nonce`` matches it is its ACK, or its NACK
  when it carries ``error_detail``. Subscription changes are honoured whatever nonce they carry.
- CDS and LDS are wildcard subscriptions; EDS and RDS name what Envoy wants (clusters it warms, route
  configurations its listeners use). With on-demand clusters CDS is named too: Envoy asks for a cluster when
  a connection first needs it, the wildcard request gets none, and a name we do not have is answered with
  its removal at once (Envoy fails that connection now instead of at its timeout).
- warming order: clusters, then endpoints, then listeners and routes -- a listener is sent only while no
  cluster update is in flight; removals go the other way: a cluster is removed only once the listener no
  longer names its key (no listener update pending or in flight).
- a NACKed response of several resources is retried one resource per response, so the one that Envoy
  refuses is known by name; that version is not sent again (a new version of it is). Everything else
  proceeds: one bad Service never blocks the rest.
- ``initial_resource_versions`` (Envoy reconnecting, or this agent restarted under a running Envoy) count
  as held: only what differs is sent.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane.resources import CLUSTER, LISTENER, ROUTE, SHORT, TYPES
from controlplane.store import Resource, Store
from shared.errors import ControlPlaneError

WILDCARD = frozenset({CLUSTER, LISTENER})
MAX_RESOURCES_PER_RESPONSE = 5_000
_nonces = itertools.count(1)


class StreamError(ControlPlaneError):
    """The peer broke the protocol in a way that ends the stream (e.g. the wrong node id)."""


@dataclass
class Inflight:
    nonce: str
    versions: dict[str, str | None]  # name -> version sent (None: removal)
    sent_at: float
    probe: bool = False


@dataclass
class TypeState:
    """One resource type on one stream."""

    type_url: str
    subscribed: set[str] | None = None  # None: wildcard
    opened: bool = False  # Envoy asked for this type
    answer_due: bool = False  # the first request is answered even with nothing to send (Envoy waits for it)
    pending: set[str] = field(default_factory=set)  # names to look at again
    sent: dict[str, str] = field(default_factory=dict)  # name -> version Envoy has or is being sent
    acked: dict[str, str] = field(default_factory=dict)  # name -> version Envoy confirmed
    inflight: Inflight | None = None
    probe: deque[str] = field(default_factory=deque)  # names of a NACKed batch, to send one by one
    nacked: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (version, Envoy's error)
    acks: int = 0
    nacks: int = 0
    last_error: str | None = None


Acked = Callable[[str, dict[str, str | None]], None]  # (type_url, name -> acked version or None: removed)


class Stream:
    """Call ``handle`` with each request and ``responses`` when it may send; both under one lock (the
    server's). ``on_ack`` hears every confirmed change (the gate); ``on_push`` every response sent."""

    def __init__(self, store: Store, *, peer: str = "", expected_node: str | None = None,
                 on_ack: Acked | None = None, on_nack: Callable[[str, list[str], str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, on_demand: bool = False) -> None:
        self.store = store
        self.peer = peer
        self.expected_node = expected_node
        self.node_id: str | None = None
        wildcard = WILDCARD - {CLUSTER} if on_demand else WILDCARD
        self.types = {t: TypeState(t, subscribed=None if t in wildcard else set()) for t in TYPES}
        self.on_demand = on_demand
        self.on_ack = on_ack
        self.on_nack = on_nack
        self.clock = clock
        self.connected_at = clock()
        self.latencies: deque[float] = deque(maxlen=1024)  # response -> ACK, seconds
        self.warnings: deque[str] = deque(maxlen=32)

    # -- store changes (any thread, under the server lock) -------------------------------------------

    def changed(self, type_url: str, names: frozenset[str]) -> None:
        state = self.types[type_url]
        if state.subscribed is None:
            state.pending |= names
        else:
            state.pending |= names & state.subscribed

    # -- requests ---------------------------------------------------------------------------------------

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if self.node_id is None:
            node = request.node.id if request.HasField("node") else ""
            if not node:
                raise StreamError("the first request carries no node id (set node.id in Envoy's bootstrap)")
            if self.expected_node and node != self.expected_node:
                raise StreamError(f"node id {node!r} is not this node ({self.expected_node!r}): "
                                  "Envoy's bootstrap must name the node its agent runs on")
            self.node_id = node
        state = self.types.get(request.type_url)
        if state is None:
            self.warnings.append(f"unknown type URL {request.type_url!r} ignored")
            return
        if not state.opened:
            state.opened = True
            state.answer_due = True
            self._open(state, request)
        else:
            self._subscriptions(state, request)
        inflight = state.inflight
        if request.response_nonce and inflight is not None and request.response_nonce == inflight.nonce:
            state.inflight = None
            self.latencies.append(self.clock() - inflight.sent_at)
            if request.HasField("error_detail"):
                self._nack(state, inflight, request.error_detail.message)
            else:
                self._ack(state, inflight)

    def _open(self, state: TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """The first request of a type: its subscriptions, and what Envoy already holds."""
        self._subscriptions(state, request)
        table_names = set(self.store.names(state.type_url))
        held = dict(request.initial_resource_versions)
        for name, version in held.items():
            current = self.store.get(state.type_url, name)
            if current is not None and current.version == version and self._wants(state, name):
                state.sent[name] = state.acked[name] = version
            elif current is None and state.subscribed is None:
                state.sent[name] = version  # Envoy holds something we no longer have: remove it
                state.pending.add(name)
        wanted = table_names if state.subscribed is None else table_names & state.subscribed
        state.pending |= {n for n in wanted if n not in state.acked}
        if held and self.on_ack is not None:
            self.on_ack(state.type_url, {n: v for n, v in state.acked.items()})

    def _subscriptions(self, state: TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        subscribe, unsubscribe = list(request.resource_names_subscribe), list(request.resource_names_unsubscribe)
        if state.subscribed is None:
            return  # wildcard: names listed by Envoy add nothing
        for name in subscribe:
            if name == "*":
                continue
            state.subscribed.add(name)
            state.pending.add(name)
        for name in unsubscribe:
            state.subscribed.discard(name)
            state.sent.pop(name, None)
            state.acked.pop(name, None)
            state.nacked.pop(name, None)
            state.pending.discard(name)

    def _wants(self, state: TypeState, name: str) -> bool:
        return state.subscribed is None or name in state.subscribed

    def _ack(self, state: TypeState, inflight: Inflight) -> None:
        state.acks += 1
        for name, version in inflight.versions.items():
            if version is None:
                state.acked.pop(name, None)
            else:
                state.acked[name] = version
                state.nacked.pop(name, None)
        if self.on_ack is not None:
            self.on_ack(state.type_url, dict(inflight.versions))

    def _nack(self, state: TypeState, inflight: Inflight, message: str) -> None:
        state.nacks += 1
        state.last_error = message
        updates = {n: v for n, v in inflight.versions.items() if v is not None}
        for name in updates:  # Envoy may hold the previous version still: send it again unless refused
            previous = state.acked.get(name)
            if previous is None:
                state.sent.pop(name, None)
            else:
                state.sent[name] = previous
        if len(updates) == 1 or inflight.probe:
            for name, version in updates.items():
                state.nacked[name] = (version, message)
        else:
            state.probe.extend(sorted(updates))
        state.pending |= set(updates)
        if self.on_nack is not None:
            self.on_nack(state.type_url, sorted(updates), message)

    # -- responses --------------------------------------------------------------------------------------

    def responses(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """Everything that may be sent now, in warming order."""
        if self.node_id is None:
            return []
        out: list[discovery_pb2.DeltaDiscoveryResponse] = []
        for type_url in TYPES:
            state = self.types[type_url]
            if not state.opened or state.inflight is not None or not (state.pending or state.probe or state.answer_due):
                continue
            if type_url in (LISTENER, ROUTE) and self.types[CLUSTER].inflight is not None:
                continue  # listeners after the clusters they route to
            response = self._next(state)
            if response is not None:
                out.append(response)
        return out

    def _next(self, state: TypeState) -> discovery_pb2.DeltaDiscoveryResponse | None:
        store = self.store
        versions: dict[str, str | None] = {}
        response = discovery_pb2.DeltaDiscoveryResponse(type_url=state.type_url)
        probe = False
        with store.lock:
            while state.probe and not probe:  # past names that vanished or need nothing now (no idle round each)
                name = state.probe.popleft()
                current = store.get(state.type_url, name)
                if current is not None and self._wants(state, name) and state.sent.get(name) != current.version:
                    _add(response, state.type_url, current)
                    versions[name] = current.version
                    probe = True
            if not probe:
                hold_removals = state.type_url == CLUSTER and self._listener_busy()
                for name in sorted(state.pending):
                    if len(versions) >= MAX_RESOURCES_PER_RESPONSE:
                        break
                    current = store.get(state.type_url, name) if self._wants(state, name) else None
                    if current is None:
                        if (self.on_demand and state.type_url == CLUSTER and name not in state.sent
                                and self._wants(state, name) and name not in state.acked):
                            response.removed_resources.append(name)  # asked for, does not exist: say so now
                            versions[name] = None
                            state.pending.discard(name)
                            continue
                        if name in state.sent and not hold_removals:
                            response.removed_resources.append(name)
                            versions[name] = None
                            del state.sent[name]
                        if not hold_removals or name not in state.sent:
                            state.pending.discard(name)
                        continue
                    state.pending.discard(name)
                    if state.sent.get(name) == current.version or state.nacked.get(name, ("",))[0] == current.version:
                        continue
                    if name in state.probe:
                        continue  # being isolated one by one
                    _add(response, state.type_url, current)
                    versions[name] = current.version
        if not versions and not state.answer_due:
            return None
        state.answer_due = False
        for name, version in versions.items():
            if version is not None:
                state.sent[name] = version
        nonce = str(next(_nonces))
        response.nonce = nonce
        response.system_version_info = str(store.revision)
        state.inflight = Inflight(nonce, versions, self.clock(), probe)
        return response

    def _listener_busy(self) -> bool:
        lds = self.types[LISTENER]
        return lds.inflight is not None or bool(lds.pending) or bool(lds.probe)

    # -- facts ------------------------------------------------------------------------------------------

    def in_sync(self) -> bool:
        """Envoy has confirmed everything it should hold (refused resources aside)."""
        for state in self.types.values():
            if not state.opened:
                if state.type_url in WILDCARD:
                    return False
                continue
            if state.inflight is not None or state.probe or state.answer_due:
                return False
            for name in state.pending:
                current = self.store.get(state.type_url, name)
                if current is None and name in state.sent:
                    return False
                if current is not None and self._wants(state, name) and state.acked.get(name) != current.version \
                        and state.nacked.get(name, ("",))[0] != current.version:
                    return False
        return True

    def summary(self) -> dict[str, object]:
        return {
            "peer": self.peer, "node": self.node_id, "connected_for_s": round(self.clock() - self.connected_at, 3),
            "in_sync": self.in_sync(),
            "types": {SHORT[t]: {"acked": len(s.acked), "pending": len(s.pending), "inflight": s.inflight is not None,
                                 "acks": s.acks, "nacks": s.nacks, "refused": len(s.nacked), "last_error": s.last_error}
                      for t, s in self.types.items()},
            "warnings": list(self.warnings),
        }


def _add(response: discovery_pb2.DeltaDiscoveryResponse, type_url: str, current: Resource) -> None:
    """One resource into a response, its ``Any`` built in the response's own arena (freed with it)."""
    added = response.resources.add(name=current.name, version=current.version)
    added.resource.type_url = type_url
    added.resource.value = current.data
