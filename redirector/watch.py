"""The node agent's watches: Services and EndpointSlices, each a ``shared.kube.Reflector``.

The list-watch loop itself (paging, bookmarks, timeouts, 410 re-list, jittered backoff) lives once in
``shared.kube``; this module only says what the agent watches. The agent watches ALL Services, with the
control plane or without (Envoy must know an eligible Service before its handoff label lands, and a label
removal must read as a MODIFIED event, a handback, not as a deletion): the label filter is the tracker's
(``ChangeTracker._labelled`` in ``redirector.changes``), configured there and nowhere else. Calls go
through ``shared.kubeapi`` (no generated API classes: their memory).
"""

from __future__ import annotations

from typing import Any

from shared.kube import EndedAtOnce, Gone, Reflector, WatchSink
from shared.kubeapi import ENDPOINT_SLICES, NODES, SERVICES, Api

__all__ = ["EndedAtOnce", "EndpointSliceWatcher", "Gone", "NodeWatcher", "ServiceWatcher", "WatchSink"]


class ServiceWatcher(Reflector):
    """Keeps ``sink`` informed about every Service (no label selector: the sink filters)."""

    def __init__(self, api: Api, sink: WatchSink, **options: Any) -> None:
        self.api = api  # the debug lookup lists through it
        super().__init__(api.lister(SERVICES), sink, what="services", **options)


class NodeWatcher(Reflector):
    """Keeps ``sink`` informed about this node's own Node object (its zone label, for topology hints)."""

    def __init__(self, api: Api, sink: WatchSink, node: str, **options: Any) -> None:
        self.api = api
        super().__init__(api.lister(NODES), sink, what="node", field_selector=f"metadata.name={node}", **options)


class EndpointSliceWatcher(Reflector):
    """Keeps ``sink`` informed about every EndpointSlice (discovery.k8s.io/v1)."""

    def __init__(self, api: Api, sink: WatchSink, **options: Any) -> None:
        self.api = api
        super().__init__(api.lister(ENDPOINT_SLICES), sink, what="endpointslices", **options)
