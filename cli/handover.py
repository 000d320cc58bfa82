"""Make-before-break migration, the CLI's side (docs/migration.md, "Handover protocol").

1. mark each Service ``lightpath.cloud/handover: migrate``;
2. wait until every LIVE node agent lists it in its Lease (``lightpath.cloud/prepared``): on each node Envoy
   has ACKed it and the redirect is installed, shadowing kube-proxy's still-present rules;
3. only then the handoff label (the caller's normal write, which also drops the mark).
A Service not prepared on every live node within the timeout is aborted cleanly: the mark goes, it stays
with kube-proxy, and the report names the nodes. An agent whose Lease expired does not block.
Each step is also an Event on the Service (cli.events): HandoverStarted, HandoverPrepared, HandoverAborted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cli import events
from cli.kube import Cluster, ClusterError
from cli.rows import Ref
from shared import constants as c
from shared.agents import live_agents

MARK = {"metadata": {"annotations": {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}}}
UNMARK = {"metadata": {"annotations": {c.HANDOVER_ANNOTATION: None}}}


@dataclass
class Outcome:
    prepared: list[Ref] = field(default_factory=list)
    not_prepared: dict[Ref, list[str]] = field(default_factory=dict)  # ref -> nodes that did not report it
    failed: dict[Ref, str] = field(default_factory=dict)  # the mark could not be written
    agents: int = 0
    uids: dict[Ref, str] = field(default_factory=dict)  # from the mark's answer: the Events' involvedObject.uid
    # The mark's answer's resourceVersion: the final write is guarded by it, so a Service someone changed
    # meanwhile (a concurrent rollback removing the mark) is not labelled -- the later intent wins.
    versions: dict[Ref, str] = field(default_factory=dict)


def prepare(cluster: Cluster, refs: list[Ref], *, namespace: str, timeout: float,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
            recorder: events.Recorder | None = None, proxy: str = c.DEFAULT_PROXY_NAME) -> Outcome:
    """Mark ``refs``, wait for every live agent; unmark the ones that did not make it."""
    outcome = Outcome()

    def emit(ref: Ref, reason: str, type_: str, message: str) -> None:
        if recorder is not None:
            recorder.emit(ref, outcome.uids.get(ref), reason, type_, message)

    if not refs:
        return outcome
    agents = live_agents(cluster.list_leases(namespace), clock())
    if not agents:  # nobody reports: nothing to wait for (the caller says so)
        outcome.prepared = list(refs)
        return outcome
    marked: list[Ref] = []
    for ref in refs:
        try:
            stored = cluster.patch_service(ref.namespace, ref.name, MARK)
            marked.append(ref)
        except ClusterError as exc:
            outcome.failed[ref] = str(exc)
            continue
        if uid := events.uid_of(stored):
            outcome.uids[ref] = uid
        if version := ((stored or {}).get("metadata") or {}).get("resourceVersion"):
            outcome.versions[ref] = str(version)
        emit(ref, c.EVENT_HANDOVER_STARTED, c.EVENT_NORMAL,
             events.started_message(proxy, len(agents), timeout))
    refs = marked
    deadline = time.monotonic() + timeout
    missing: dict[Ref, list[str]] = {}
    while refs:
        agents = live_agents(cluster.list_leases(namespace), clock())
        missing = {ref: sorted(n for n, done in agents.items() if str(ref) not in done) for ref in refs}
        if not agents or not any(missing.values()) or time.monotonic() >= deadline:
            break
        sleep(0.1)
    outcome.agents = len(agents)
    for ref in refs:
        nodes = missing.get(ref, []) if agents else []
        if nodes:
            outcome.not_prepared[ref] = nodes
            cluster.patch_service(ref.namespace, ref.name, UNMARK)
            emit(ref, c.EVENT_HANDOVER_ABORTED, c.EVENT_WARNING,
                 events.aborted_message(timeout, nodes, len(agents)))
        else:
            outcome.prepared.append(ref)
            if agents:
                emit(ref, c.EVENT_HANDOVER_PREPARED, c.EVENT_NORMAL,
                     events.prepared_message(len(agents), len(agents)))
    return outcome
