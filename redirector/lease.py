"""The agent's Lease (coordination.k8s.io/v1): "this node's agent is alive, and has prepared these Services".

Make-before-break migration (docs/migration.md, "Handover protocol"): whoever migrates a Service first
marks it (``lightpath.cloud/handover: migrate``); every agent then installs its redirect once Envoy serves
it -- the redirect hooks before kube-proxy's DNAT and takes the traffic while kube-proxy still has rules --
and lists it in its Lease's ``lightpath.cloud/prepared`` annotation. The handoff label is set once every
LIVE agent (renewTime + leaseDurationSeconds in the future) lists it; an expired Lease does not block.
The list holds only Services in handover (bounded), so the Lease stays small.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from shared import constants as c
from shared.kubeapi import LEASES, MERGE_PATCH, Api

log = logging.getLogger(__name__)
MAX_PREPARED = 1000


def lease_name(node: str) -> str:
    return f"{c.AGENT_LEASE_PREFIX}{node}"[:253]


def lease_body(node: str, prepared: list[str], now: datetime, duration: int = c.AGENT_LEASE_SECONDS,
               redirects: int | None = None, traffic: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Lease as the agent writes it (pure). ``traffic``: controlplane.servicemetrics.summary's figures;
    None writes an empty one (a merge patch: the previous figures must not linger)."""
    shown = sorted(prepared)[:MAX_PREPARED]
    annotations = {c.PREPARED_ANNOTATION: json.dumps(shown, separators=(",", ":"))}
    if redirects is not None:
        annotations[c.REDIRECTS_ANNOTATION] = str(redirects)
    annotations[c.TRAFFIC_ANNOTATION] = json.dumps(traffic or {}, separators=(",", ":"))
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": lease_name(node), "labels": {"app.kubernetes.io/name": "lightpath-redirector"},
                     "annotations": annotations},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": stamp},
    }


class LeaseReporter:
    """Renews the Lease every ``period`` seconds, and soon after ``changed()`` (prepared Services moved)."""

    def __init__(self, api: Api, namespace: str, node: str, prepared: Callable[[], list[str]], *,
                 period: float = 5.0, duration: int = c.AGENT_LEASE_SECONDS,
                 redirects: Callable[[], int] | None = None,
                 traffic: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.api = api
        self.traffic = traffic
        self.namespace, self.node, self.prepared, self.redirects = namespace, node, prepared, redirects
        self.last_redirects: int | None = None
        self.period, self.duration = period, duration
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last: list[str] | None = None
        self.writes = 0
        self.last_error: str | None = None

    def changed(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        due = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                # renew on schedule, or when what it reports changed
                if now >= due or self.prepared() != self.last or self._redirects() != self.last_redirects:
                    self.write()
                    due = now + self.period
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - e.g. the namespace or RBAC is missing: say so, retry
                if self.last_error is None:
                    log.warning("cannot write the agent's Lease (migrations cannot see this node as prepared)",
                                extra={"namespace": self.namespace, "error": str(exc)[:300]})
                self.last_error = str(exc)[:300]
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stop.wait(0.02):  # coalesce a burst of changes
                return

    def _traffic(self) -> dict[str, Any] | None:
        if self.traffic is None:
            return None
        try:
            return self.traffic()
        except Exception as exc:  # noqa: BLE001 - traffic figures are a nicety; the Lease must be written
            log.debug("no traffic figures for the Lease", extra={"error": str(exc)[:200]})
            return None

    def _redirects(self) -> int | None:
        return self.redirects() if self.redirects is not None else None

    def write(self) -> None:
        prepared, redirects = self.prepared(), self._redirects()
        figures = self._traffic()
        body = lease_body(self.node, prepared, datetime.now(UTC), self.duration, redirects, figures)
        name = body["metadata"]["name"]
        try:  # a merge patch: no resourceVersion to track, and another writer's fields are left alone
            self.api.patch(LEASES, self.namespace, name, body, content_type=MERGE_PATCH, timeout=5)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.api.create(LEASES, self.namespace, body, timeout=5)
        self.last, self.last_redirects = prepared, redirects
        self.writes += 1
