"""Is this agent's DaemonSet being deleted? Then its rules go with it; on any other exit they stay.

WHY: a rolling update, an eviction or a crash must keep the rules (the next agent adopts them and no
connection fails), but after ``kubectl delete`` of the agent's DaemonSet nobody would ever remove them:
they keep overriding kube-proxy for Services handed back later, until a reboot. A SIGTERM looks the same
in both cases, so the agent watches its own DaemonSet (one object: a field-selected watch, which RBAC
can limit to that name) and remembers whether it was deleted or marked for deletion. The answer is
taken from the watch, not from a request at exit: ``kubectl delete -k`` removes the agent's RBAC and
ServiceAccount at the same moment, so a late question would be refused. Unsure (never saw the DaemonSet,
watch broken): keep the rules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from shared.kube import Reflector
from shared.kubeapi import DAEMON_SETS, Api

log = logging.getLogger(__name__)


class OwnerState:
    """A ``WatchSink`` for one DaemonSet: ``deleting`` once it is gone or has a deletionTimestamp."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = False
        self.deleting = False
        self._lock = threading.Lock()

    def _saw(self, obj: dict[str, Any] | None, why: str) -> None:
        with self._lock:
            was = self.deleting
            if obj is None:
                self.deleting = self.seen  # gone: deleted, if it ever was there
            else:
                self.seen = True
                self.deleting = bool((obj.get("metadata") or {}).get("deletionTimestamp"))
            if self.deleting and not was:
                log.warning("this agent's DaemonSet is being deleted: its rules are removed when it stops",
                            extra={"daemonset": self.name, "seen_as": why})

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.name]
        self._saw(mine[0] if mine else None, "listed")

    def upsert(self, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") == self.name:
            self._saw(obj, "modified")

    def delete(self, obj: dict[str, Any]) -> None:
        if (obj.get("metadata") or {}).get("name") == self.name:
            self._saw(None, "deleted")

    def restarted(self, reason: str) -> None:
        pass


def owner_watch(api: Api, namespace: str, name: str, state: OwnerState, **options: Any) -> Reflector:
    return Reflector(api.lister(DAEMON_SETS, namespace), state, what="daemonset",
                     field_selector=f"metadata.name={name}", **options)
