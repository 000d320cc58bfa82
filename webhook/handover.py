"""The handover controller: finishes the make-before-break migrations nobody else drives.

WHY: the webhook marks a Service that becomes wanted on UPDATE (a Namespace opt-in followed by any write,
a label removed by hand while opted in) instead of labelling it, so that every node's agent can prepare it
first (Envoy ACKed, redirect installed, shadowing kube-proxy's rules); see docs/migration.md, "Handover
protocol". A migration must never depend on a terminal staying open, so this controller, leader-elected
among the webhook's replicas (``webhook.leader``), watches marked Services and, like ``lightpath migrate``:

- labels a Service (and removes its mark, in one write) once every LIVE agent lists it in its Lease --
  agents whose Lease expired do not block;
- aborts it after ``timeout`` (the mark goes, the Service stays with kube-proxy; the Service's next change
  starts a new attempt), naming the nodes that were not ready;
- removes a stale mark the policy no longer wants after twice the timeout (its driver -- a CLI -- is gone).

Each step is also a Kubernetes Event on the Service. ``actions`` is the pure core; ``HandoverController``
the shell (one Reflector for Services, a Lease list per round while something is marked).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shared import constants as c
from shared.agents import live_agents
from shared.events import bounded, event_body, node_list
from shared.kube import Reflector
from shared.kubeapi import EVENTS, LEASES, SERVICES, Api
from shared.policy import Action, PolicyConfig, decide

log = logging.getLogger(__name__)
LEADER_LEASE = "lightpath-handover-controller"
COMPONENT = "lightpath-handover-controller"


@dataclass(frozen=True)
class Marked:
    """A marked Service as the controller tracks it."""

    sid: str  # namespace/name
    wanted: bool  # the policy would label it now
    since: float  # monotonic: when this controller first saw the mark


@dataclass(frozen=True)
class Step:
    sid: str
    what: str  # "label" | "abort" | "drop"
    nodes: tuple[str, ...] = ()  # abort: the live nodes that had not prepared it
    agents: int = 0


def actions(marked: Iterable[Marked], agents: Mapping[str, set[str]], now: float, timeout: float) -> list[Step]:
    """What to do with each marked Service this round (nothing: keep waiting). Pure."""
    out = []
    for m in marked:
        missing = tuple(sorted(node for node, done in agents.items() if m.sid not in done))
        if m.wanted and not missing:
            out.append(Step(m.sid, "label", agents=len(agents)))
        elif m.wanted and now - m.since >= timeout:
            out.append(Step(m.sid, "abort", missing, len(agents)))
        elif not m.wanted and now - m.since >= 2 * timeout:
            out.append(Step(m.sid, "drop"))
    return out


def event_recorder(api: client.ApiClient, instance: str) -> Callable[[Mapping[str, Any], str, str, str], None]:
    """``emit`` for the controller: a core/v1 Event on the Service (``shared.events``)."""
    kube = Api(api)

    def emit(svc: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = svc.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        body: Any = event_body(namespace, name, meta.get("uid"), reason, type_, message, action="Handover",
                          now=datetime.now(UTC), component=COMPONENT, instance=instance)
        kube.create(EVENTS, namespace, body, timeout=2)

    return emit


class _MarkedCache:
    """The Reflector's sink: the marked Services only (the rest is dropped on arrival)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}

    @staticmethod
    def _sid(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace')}/{meta.get('name')}"

    @staticmethod
    def _marked(obj: Mapping[str, Any]) -> bool:
        """Carries the handover annotation, whatever its value (the round tells a mark from garbage)."""
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return isinstance(annotations, dict) and c.HANDOVER_ANNOTATION in annotations

    def replace(self, items: Iterable[dict[str, Any]]) -> None:
        marked = {self._sid(o): o for o in items if self._marked(o)}
        now = time.monotonic()
        with self.lock:
            self.services = marked
            self.seen = {sid: self.seen.get(sid, now) for sid in marked}

    def upsert(self, obj: dict[str, Any]) -> None:
        sid = self._sid(obj)
        with self.lock:
            if self._marked(obj):
                self.services[sid] = obj
                self.seen.setdefault(sid, time.monotonic())
            else:
                self.services.pop(sid, None)
                self.seen.pop(sid, None)

    def delete(self, obj: dict[str, Any]) -> None:
        self.upsert({"metadata": {**(obj.get("metadata") or {}), "annotations": {}}})

    def restarted(self, reason: str) -> None:
        pass


@dataclass
class HandoverController:
    api: client.ApiClient
    policy: PolicyConfig
    namespace_labels: Callable[[str], Mapping[str, str] | None]
    agent_namespace: str = c.DEFAULT_AGENT_NAMESPACE
    timeout: float = 60.0
    period: float = 0.5
    leading: Callable[[], bool] = lambda: True
    emit: Callable[[Mapping[str, Any], str, str, str], None] | None = None  # (service, type, reason, message)
    done: dict[str, int] = field(default_factory=lambda: {"label": 0, "abort": 0, "drop": 0})

    def __post_init__(self) -> None:
        self.kube = Api(self.api)
        self.cache = _MarkedCache()
        self.reflector = Reflector(self.kube.lister(SERVICES), self.cache, what="services")
        self._stop = threading.Event()
        self._announced: set[str] = set()
        self.rounds = 0  # rounds considered (leading or not): lets a test see time pass without sleeping

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.reflector.run, name="handover-services", daemon=True),
                   threading.Thread(target=self.run, name="handover-controller", daemon=True)]
        for thread in threads:
            thread.start()
        return threads

    def stop(self) -> None:
        self._stop.set()
        self.reflector.stop()

    def run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                if self.leading():
                    self.round(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - never let the controller die; the next round retries
                log.warning("handover controller round failed", extra={"error": str(exc)[:300]})
            self.rounds += 1

    def round(self, now: float) -> list[Step]:
        with self.cache.lock:
            services = dict(self.cache.services)
            seen = dict(self.cache.seen)
        self._announced &= set(services)  # forget Services whose annotation went
        if not services:
            return []
        leases = self.kube.read_list(LEASES, self.agent_namespace, _request_timeout=5)
        items: list[dict[str, Any]] = [i for i in leases.get("items") or [] if isinstance(i, dict)]
        agents = live_agents(items, datetime.now(UTC))
        marked = []
        for sid, svc in services.items():
            labels = self.namespace_labels(sid.partition("/")[0])
            decision = decide(svc, labels or {}, self.policy)
            value = ((svc.get("metadata") or {}).get("annotations") or {}).get(c.HANDOVER_ANNOTATION)
            if value != c.HANDOVER_MIGRATE or not decision.eligible or decision.wants_proxy is None:
                self._ignored(sid, svc, value, decision.reason)
                if value != c.HANDOVER_MIGRATE:
                    continue  # not a mark: nobody acts on it (the agents ignore it too)
            wanted = labels is not None and decision.action is Action.LABEL
            marked.append(Marked(sid, wanted, seen.get(sid, now)))
            if sid not in self._announced and wanted:
                self._announced.add(sid)
                self._event(svc, c.EVENT_NORMAL, c.EVENT_HANDOVER_STARTED,
                            f"handover to {self.policy.proxy_name} started: waiting for {len(agents)} live node agent(s)")
        steps = actions(marked, agents, now, self.timeout)
        for step in steps:
            self._apply(step, services[step.sid], now - seen.get(step.sid, now))
        return steps

    def _ignored(self, sid: str, svc: Mapping[str, Any], value: object, reason: str) -> None:
        """A handover annotation the agents ignore (never a half-migrated Service): say so once, as a Warning."""
        if sid in self._announced:
            return
        self._announced.add(sid)
        why = (f"value {str(value)[:64]!r} is not {c.HANDOVER_MIGRATE!r}" if value != c.HANDOVER_MIGRATE
               else f"the Service cannot be handed over ({reason})")
        log.warning("handover annotation ignored", extra={"service": sid, "why": why})
        self._event(svc, c.EVENT_WARNING, c.EVENT_HANDOVER_IGNORED, f"{c.HANDOVER_ANNOTATION} ignored: {why}")

    def _apply(self, step: Step, svc: Mapping[str, Any], waited: float) -> None:
        namespace, _, name = step.sid.partition("/")
        meta: dict[str, Any] = {"annotations": {c.HANDOVER_ANNOTATION: None},
                                "resourceVersion": (svc.get("metadata") or {}).get("resourceVersion")}
        if step.what == "label":
            meta["labels"] = {c.SERVICE_PROXY_NAME_LABEL: self.policy.proxy_name}
        try:  # the resourceVersion: a Service changed meanwhile is looked at again next round
            self.kube.patch(SERVICES, namespace, name, {"metadata": meta}, timeout=5)
        except ApiException as exc:
            log.info("handover step not written (the Service changed or went)", extra={
                "service": step.sid, "step": step.what, "status": exc.status})
            return
        self.done[step.what] += 1
        self._announced.discard(step.sid)
        if step.what == "label":
            message = f"prepared on all {step.agents} live node(s): handed to {self.policy.proxy_name} after {waited:.1f}s"
            log.info("handover done", extra={"service": step.sid, "agents": step.agents, "seconds": round(waited, 3)})
            self._event(svc, c.EVENT_NORMAL, c.EVENT_MIGRATED, message)
        elif step.what == "abort":
            message = (f"not prepared within {self.timeout:g}s on {len(step.nodes)} of {step.agents} live node(s) "
                       f"({node_list(step.nodes)}): the mark is removed, the Service stays with kube-proxy; its next "
                       "change tries again")
            log.warning("handover aborted", extra={"service": step.sid, "nodes": list(step.nodes[:20])})
            self._event(svc, c.EVENT_WARNING, c.EVENT_HANDOVER_ABORTED, message)
        else:
            log.info("stale handover mark removed", extra={"service": step.sid})

    def _event(self, svc: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        if self.emit is None:
            return
        try:
            self.emit(svc, kind, reason, bounded(message))
        except Exception as exc:  # noqa: BLE001 - an Event is information: never stop a handover for it
            log.warning("cannot write an Event", extra={"reason": reason, "error": str(exc)[:200]})
