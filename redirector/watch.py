"""The node agent's watches: Services and EndpointSlices, each a ``shared.kube.Reflector``.

The list-watch loop itself (paging, bookmarks, timeouts, 410 re-list, jittered backoff) lives once in
``shared.kube``; this module only says what the agent watches. With the control plane the agent watches
ALL Services (Envoy must know an eligible Service before its handoff label lands, and a label removal must
read as a MODIFIED event, not as a deletion); the label filter for the kernel is the tracker's
(``redirector.changes``). ``labelled_only`` keeps the label-selector watch for a kernel-only agent. Calls
go through ``shared.kubeapi`` (no generated API classes: their memory).
"""

from __future__ import annotations

from typing import Any

from shared import constants as c
from shared.kube import EndedAtOnce, Gone, Reflector, WatchSink
from shared.kubeapi import ENDPOINT_SLICES, NODES, SERVICES, Api

__all__ = ["EndedAtOnce", "EndpointSliceWatcher", "Gone", "NodeWatcher", "ServiceWatcher", "WatchSink"]


class ServiceWatcher(Reflector):
    """Keeps ``sink`` informed about Services: those labelled for ``proxy_name`` (``labelled_only``), or all."""

    def __init__(self, api: Api, sink: WatchSink, *, proxy_name: str = c.DEFAULT_PROXY_NAME,
                 labelled_only: bool = True, **options: Any) -> None:
        self.api = api  # the debug lookup lists through it
        selector = f"{c.SERVICE_PROXY_NAME_LABEL}={proxy_name}" if labelled_only else None
        super().__init__(api.lister(SERVICES), sink, what="services", label_selector=selector, **options)


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
