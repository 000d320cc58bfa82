"""Kubernetes Events on the Service during a handover: what `kubectl describe service` shows the operator.

core/v1 Events with ``involvedObject`` (the form client-go's recorder writes, and what kubectl describe
lists by involvedObject name, namespace, kind and uid), source and reportingComponent ``lightpath-cli``.
The reasons live in shared/constants.py; docs/migration.md ("Events") lists them.

Pure builders (message and body) plus a thin ``Recorder``. WHY an Event write can never hurt a migration:
it is a report, not a step. A refused or slow write is said once per namespace and the Recorder stops
writing Events there (short request timeout), so a missing RBAC grant costs one request, not one per Service.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cli.kube import Cluster, ClusterError
from cli.rows import Ref
from shared import constants as c
from shared import events as shared_events
from shared.events import bounded, node_list


def _agents(n: int) -> str:
    return f"{n} live node agent{'s' if n != 1 else ''}"


def started_message(proxy: str, agents: int, timeout: float) -> str:
    return f"migration to {proxy} started: waiting for {_agents(agents)} to prepare it (timeout {timeout:g}s)"


def prepared_message(prepared: int, agents: int) -> str:
    return f"prepared on {prepared}/{agents} nodes: Envoy serves it and the redirect is in place on every live node"


def aborted_message(timeout: float, not_ready: Sequence[str], agents: int) -> str:
    prepared = agents - len(not_ready)
    # the counts and the outcome first: only the node list at the end can be cut by the 1 KiB bound
    return bounded(
        f"not prepared within {timeout:g}s on {len(not_ready)} of {agents} live node(s) (prepared on "
        f"{prepared}/{agents}); aborted: the mark is removed and kube-proxy keeps serving it "
        f"(`lightpath-redirector debug proxy` on those nodes says why); not ready: {node_list(not_ready)}"
    )


def migrated_message(proxy: str, seconds: float, verb: str, agents: int | None, *, handover: bool = True) -> str:
    if not handover:
        how = "--no-handover: labelled at once, without make-before-break"
    elif agents:
        how = f"make-before-break: prepared on {agents}/{agents} live nodes first"
    else:
        how = "no live node agent Lease: labelled at once, without make-before-break"
    return f"migrated to {proxy} by `lightpath {verb}` in {seconds:.2f}s ({how})"


def rolled_back_message(seconds: float, verb: str) -> str:
    return (f"handed back to kube-proxy by `lightpath {verb}` in {seconds:.2f}s (each node agent keeps its "
            "redirect until kube-proxy's rule is in place)")


def event_body(ref: Ref, uid: str | None, reason: str, type_: str, message: str, *, action: str, now: datetime,
               instance: str) -> dict[str, Any]:
    """The core/v1 Event the CLI writes (``shared.events.event_body``, component ``lightpath-cli``)."""
    return shared_events.event_body(ref.namespace, ref.name, uid, reason, type_, message, action=action, now=now,
                                    component=c.CLI_COMPONENT, instance=instance)


def uid_of(service: dict[str, Any] | None) -> str | None:
    uid = ((service or {}).get("metadata") or {}).get("uid")
    return str(uid) if uid else None


@dataclass
class Recorder:
    """Writes Events for one command run; never raises, and gives up on a namespace after its first refusal."""

    cluster: Cluster | None  # None: Events are off (--no-events)
    say: Callable[[str], None]
    action: str  # "Migrate", "Rollback", "Reconcile"
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    instance: str = field(default_factory=lambda: f"{c.CLI_COMPONENT}@{socket.gethostname()}")
    written: int = 0
    broken: dict[str, str] = field(default_factory=dict)  # namespace -> why Events are not written there

    def emit(self, ref: Ref, uid: str | None, reason: str, type_: str, message: str) -> None:
        if self.cluster is None or ref.namespace in self.broken:
            return
        body = event_body(ref, uid, reason, type_, message, action=self.action, now=self.clock(),
                          instance=self.instance)
        try:
            self.cluster.create_event(ref.namespace, body)
        except ClusterError as exc:
            self.broken[ref.namespace] = str(exc)
            self.say(f"warning   cannot write Events in namespace {ref.namespace} ({exc}): continuing without "
                     "them there")
            return
        self.written += 1
