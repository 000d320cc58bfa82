"""What the debug server reads from the agent: a small Protocol, and the adapter over ``redirector.agent``.

WHY a Protocol: the debug server must never reach into the sync loop's internals (or hold its locks
longer than a copy takes). Everything it reads is listed here; ``AgentSource`` maps it onto the agent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from redirector.model import DesiredState
from shared import kube
from shared.kubeapi import SERVICES

log = logging.getLogger(__name__)

MAX_LIST_PAGES = 200  # a one-shot list for /debug/lookup stops after 200 x 500 Services


@dataclass(frozen=True)
class SyncFacts:
    """The sync loop's health facts (wall-clock Unix times, None = never)."""

    started: float  # when the agent (its debug source) started: the grace period before a first sync
    loop_alive: bool
    listed: bool  # the first list of Services completed
    first_sync_done: bool
    last_success: float | None
    last_full_sync: float | None = None
    last_incremental_sync: float | None = None
    full_sync_pending: bool = False
    last_error: str | None = None
    last_error_time: float | None = None
    watch_connected: bool | None = None
    resource_version: str | None = None
    # The control plane (None: the agent runs without one). True once the newest Envoy ACKed everything.
    proxy_in_sync: bool | None = None
    proxy_detail: str | None = None


class DebugSource(Protocol):
    """Exactly what the debug endpoints read from the agent. Implementations must be thread-safe."""

    @property
    def registry(self) -> CollectorRegistry:
        """The agent's Prometheus registry (/metrics)."""
        ...

    def desired(self) -> DesiredState:
        """A consistent copy of the desired state (/debug/services, /debug/diff, /debug/lookup)."""
        ...

    def sync_facts(self) -> SyncFacts:
        """The sync loop's health facts (/healthz, /readyz)."""
        ...

    def proxy_report(self, limit: int, service: str | None) -> dict[str, Any] | None:
        """What the node's Envoy holds per Service (/debug/proxy); None without a control plane."""
        ...

    def list_services(self) -> list[dict[str, Any]] | None:
        """Every Service in the cluster, listed once from the API (/debug/lookup); None without an API."""
        ...


class AgentSource:
    """``DebugSource`` over a ``redirector.agent.Agent``: reads ``desired()``, ``status``, ``tracker``,
    ``metrics.registry`` and ``watcher`` (for its ``shared.kubeapi.Api``, ``connected``, ``resource_version``)."""

    def __init__(
        self,
        agent: Any,
        *,
        sync_thread: threading.Thread | None = None,
        api: Any = None,
        clock: Callable[[], float] = time.time,
        list_timeout: float = 10.0,
        page_size: int = 500,
    ) -> None:
        self.agent = agent
        self.sync_thread = sync_thread
        self._api = api
        self.started = clock()
        self.list_timeout = list_timeout
        self.page_size = page_size

    @property
    def registry(self) -> CollectorRegistry:
        registry: CollectorRegistry = self.agent.metrics.registry
        return registry

    def desired(self) -> DesiredState:
        state: DesiredState = self.agent.desired()
        return state

    def sync_facts(self) -> SyncFacts:
        status = self.agent.status
        watcher = getattr(self.agent, "watcher", None)
        tracker = getattr(self.agent, "tracker", None)
        listed = getattr(tracker, "listed", None)
        stopping = getattr(self.agent, "_stop", None)
        if self.sync_thread is not None:
            alive = self.sync_thread.is_alive()
        else:  # no thread handle: alive until stopped (staleness still catches a dead loop)
            alive = not (isinstance(stopping, threading.Event) and stopping.is_set())
        return SyncFacts(
            started=self.started,
            loop_alive=alive,
            listed=bool(listed.is_set()) if isinstance(listed, threading.Event) else bool(status.first_sync_done),
            first_sync_done=bool(status.first_sync_done),
            last_success=status.last_success,
            last_full_sync=status.last_full_sync,
            last_incremental_sync=status.last_incremental_sync,
            full_sync_pending=bool(status.full_sync_pending),
            last_error=status.last_error,
            last_error_time=status.last_error_time,
            watch_connected=getattr(watcher, "connected", None),
            resource_version=getattr(watcher, "resource_version", None),
            **self._proxy_facts(),
        )

    def _proxy_facts(self) -> dict[str, Any]:
        plane = getattr(self.agent, "plane", None)
        if plane is None:
            return {}
        fallback = getattr(self.agent, "fallback", None)
        if fallback is not None and fallback.active:
            return {"proxy_in_sync": False,
                    "proxy_detail": "Envoy is down: migrated Services are load-balanced by the kernel fallback "
                                    "(L4 only: no retries, timeouts or outlier detection)"}
        if plane.in_sync():
            return {"proxy_in_sync": True, "proxy_detail": f"Envoy ACKed revision {plane.store.revision}"}
        server = plane.server
        stream = server.newest() if server is not None else None
        if stream is None:
            detail = "no Envoy connected to the control plane"
        elif not plane.first_push_done.is_set():
            detail = "the control plane has not translated the first list yet"
        else:
            detail = f"Envoy {stream.node_id} has not ACKed revision {plane.store.revision} yet"
        return {"proxy_in_sync": False, "proxy_detail": detail}

    def proxy_report(self, limit: int, service: str | None) -> dict[str, Any] | None:
        plane = getattr(self.agent, "plane", None)
        if plane is None:
            return None
        report: dict[str, Any] = plane.report(limit=limit, service=service)
        report["gated_entries"] = self.agent.gated()
        # Handovers on this node: marked Services prepared here, and handed-back keys still held until
        # kube-proxy's rule is visible (seconds held so far).
        report["handover"] = {"prepared": self.agent.prepared(), "held": self.agent.held()}
        fallback = getattr(self.agent, "fallback", None)
        report["fallback"] = None if fallback is None else {
            "active": fallback.active, "switches": fallback.switches, "last_error": fallback.last_error}
        return report

    def list_services(self) -> list[dict[str, Any]] | None:
        api = self._api if self._api is not None else getattr(getattr(self.agent, "watcher", None), "api", None)
        if api is None:
            return None
        return list_all_services(api, page_size=self.page_size, timeout=self.list_timeout)


def list_all_services(api: Any, *, page_size: int = 500, timeout: float = 10.0) -> list[dict[str, Any]]:
    """All Services as plain dicts, paged (``shared.kube.pages``), at most ``MAX_LIST_PAGES`` pages."""
    items: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    for page in kube.pages(api.lister(SERVICES), page_size=page_size, request_timeout=timeout,
                           max_pages=MAX_LIST_PAGES):
        items.extend(i for i in page.get("items") or [] if isinstance(i, dict))
        last = page
    if (last.get("metadata") or {}).get("continue"):
        log.warning("service list truncated", extra={"pages": MAX_LIST_PAGES, "services": len(items)})
    return items
