"""Carry out a plan in batches, verifying each batch by reading the Services back (the imperative shell).

WHY verify by reading back: our write only sets lightpath.cloud/proxy; the handoff label is added or
removed by the webhook on that UPDATE. If the webhook is down (failurePolicy Ignore) the write succeeds
and nothing moves, so success is judged on the object as stored, never on our own request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from cli import events, handover
from cli.kube import Cluster, ClusterError
from cli.plan import Item, Plan, Step, touch_patch, verify
from cli.progress import Progress
from cli.rows import KUBE_PROXY, LIGHTPATH, Ref, display_handler
from shared import constants as c
from shared.events import node_list
from shared.policy import PolicyConfig

PAST = {"migrate": "migrated", "rollback": "rolled back", "reconcile": "reconciled"}


def now_stamp() -> str:
    """RFC 3339 with microseconds: two touches never write the same value (a no-op write might skip admission)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Report:
    """Exactly what happened: which objects were written, verified, failed or never attempted."""

    verb: str
    namespaces_changed: list[Ref] = field(default_factory=list)
    changed: list[Ref] = field(default_factory=list)  # Services we wrote to (verified or not)
    verified: list[Ref] = field(default_factory=list)
    failures: list[tuple[Ref, str]] = field(default_factory=list)
    not_attempted: list[Ref] = field(default_factory=list)
    unchanged: list[Ref] = field(default_factory=list)
    skipped: list[tuple[Ref, str]] = field(default_factory=list)
    paths: dict[Ref, str] = field(default_factory=dict)  # reconcile: "webhook" or "direct"
    interrupted: bool = False
    durations: dict[Ref, float] = field(default_factory=dict)  # verified Service -> seconds from its batch's start
    aborted: dict[Ref, list[str]] = field(default_factory=dict)  # handover aborted -> nodes that did not prepare it
    seconds: float = 0.0  # the whole run

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "namespacesChanged": [r.name for r in self.namespaces_changed],
            "changed": [str(r) for r in self.changed],
            "verified": [str(r) for r in self.verified],
            "failed": [{"service": str(r), "message": m} for r, m in self.failures],
            "notAttempted": [str(r) for r in self.not_attempted],
            "unchanged": [str(r) for r in self.unchanged],
            "skipped": [{"service": str(r), "reason": m} for r, m in self.skipped],
            "paths": {str(r): p for r, p in self.paths.items()},
            "durationSeconds": round(self.seconds, 3),
            "durations": {str(r): round(s, 3) for r, s in self.durations.items()},
            "aborted": [{"service": str(r), "nodes": n} for r, n in self.aborted.items()],
        }


@dataclass
class Runner:
    """Applies one Plan; ``say`` prints a progress line for each object as soon as it is done."""

    cluster: Cluster
    config: PolicyConfig
    ns_labels: dict[str, dict[str, str]]
    say: Callable[[str], None]
    batch: int = 10
    pause: float = 0.0
    continue_on_error: bool = False
    verify_timeout: float = 10.0
    progress_stream: TextIO | None = None
    now: Callable[[], str] = now_stamp
    sleep: Callable[[float], None] = time.sleep
    handover: bool = True  # migrate make-before-break (cli.handover) when node agents report in Leases
    handover_timeout: float = 30.0
    agent_namespace: str = c.DEFAULT_AGENT_NAMESPACE
    recorder: events.Recorder | None = None  # Events on the Services (cli.events); None: none written
    versions: dict[Ref, str] = field(default_factory=dict)  # marked Services -> resourceVersion of the mark

    def run(self, plan: Plan) -> Report:
        report = Report(plan.verb)
        begun = time.monotonic()
        try:
            return self._run(plan, report)
        finally:
            report.seconds = time.monotonic() - begun

    def _run(self, plan: Plan, report: Report) -> Report:
        for item in plan.services:
            if item.step is Step.UNCHANGED:
                report.unchanged.append(item.ref)
            elif item.step is Step.SKIP:
                report.skipped.append((item.ref, item.reason))
        todo = [i for i in plan.services if i.actionable]
        progress = Progress(self.progress_stream, len(todo), plan.verb) if self.progress_stream else None
        try:
            if not self._namespaces(plan.namespaces, report):
                report.not_attempted.extend(i.ref for i in todo)
                return report
            for ref, reason in report.skipped:
                self.say(f"skipped   {ref}: {reason}")
            for start in range(0, len(todo), max(self.batch, 1)):
                chunk = todo[start : start + max(self.batch, 1)]
                if start and self.pause > 0:
                    self.sleep(self.pause)
                try:
                    stop = self._batch(plan.verb, chunk, report)
                finally:
                    if progress:
                        progress.advance(len(chunk))
                if stop:
                    report.not_attempted.extend(i.ref for i in todo[start + len(chunk) :])
                    break
        except KeyboardInterrupt:
            report.interrupted = True
            seen = {*report.changed, *(r for r, _ in report.failures)}
            report.not_attempted.extend(
                i.ref for i in todo if i.ref not in seen and i.ref not in report.not_attempted
            )
        finally:
            if progress:
                progress.clear()
        return report

    def _namespaces(self, items: Sequence[Item], report: Report) -> bool:
        for item in items:
            if item.step is not Step.LABEL or item.patch is None:
                continue
            try:
                stored = self.cluster.patch_namespace(item.ref.name, item.patch)
            except ClusterError as exc:
                report.failures.append((item.ref, f"namespace {item.ref.name}: {exc}"))
                self.say(f"FAILED    namespace {item.ref.name} (see the error below)")
                if not self.continue_on_error:
                    return False
                continue
            labels = (stored.get("metadata") or {}).get("labels") or {}
            self.ns_labels[item.ref.name] = {str(k): str(v) for k, v in labels.items()}
            report.namespaces_changed.append(item.ref)
            value = item.patch["metadata"]["labels"][c.OPT_LABEL]
            self.say(f"labelled  namespace {item.ref.name} {c.OPT_LABEL}={value}")
        return True

    def _prepare(self, verb: str, chunk: Sequence[Item], report: Report) -> tuple[list[Item], bool, int | None]:
        """Migration: every live node agent prepares the Services before their label (cli.handover).
        The int: how many live agents prepared them (None: no handover in this batch)."""
        movers = [i for i in chunk if verb in ("migrate", "reconcile") and self.handover and i.expect == "lightpath"]
        if not movers:
            return list(chunk), False, None
        try:
            outcome = handover.prepare(self.cluster, [i.ref for i in movers], namespace=self.agent_namespace,
                                       timeout=self.handover_timeout, sleep=self.sleep, recorder=self.recorder,
                                       proxy=self.config.proxy_name)
            self.versions.update(outcome.versions)
        except ClusterError as exc:
            for item in movers:
                report.failures.append((item.ref, f"{item.ref}: handover: {exc}"))
            return [i for i in chunk if i not in movers], not self.continue_on_error, None
        if outcome.agents == 0:
            self.say(f"warning   no node agent reports in namespace {self.agent_namespace} (no live Lease): "
                     "migrating without make-before-break")
        elif outcome.prepared:
            self.say(f"prepared  {len(outcome.prepared)} Service(s) on all {outcome.agents} live node(s)")
        for ref, nodes in outcome.not_prepared.items():
            shown = node_list(nodes)
            report.aborted[ref] = nodes
            report.failures.append((ref, f"{ref}: not prepared within {self.handover_timeout:g}s on node(s) {shown} "
                                         "(aborted: the mark is removed, the Service stays with kube-proxy; see "
                                         "`lightpath-redirector debug proxy` on those nodes)"))
            self.say(f"ABORTED   {ref} (not prepared on {len(nodes)} node(s))")
        for ref, message in outcome.failed.items():
            report.failures.append((ref, f"{ref}: {message}"))
            self.say(f"FAILED    {ref} (see the error below)")
        stop = bool(outcome.not_prepared or outcome.failed) and not self.continue_on_error
        dropped = {*outcome.not_prepared, *outcome.failed}
        keep = [i for i in chunk if i not in movers or i.ref not in dropped]
        if stop:  # the rest of the batch is still written (prepared), the run ends after it
            return keep, True, outcome.agents
        return keep, False, outcome.agents

    def _batch(self, verb: str, chunk: Sequence[Item], report: Report) -> bool:
        """Write a batch, read it back, verify. Returns True when the run must stop."""
        written: list[Item] = []
        started = time.monotonic()
        chunk, stop, agents = self._prepare(verb, chunk, report)
        uids: dict[Ref, str | None] = {}
        for item in chunk:
            assert item.patch is not None
            patch = item.patch
            if verb in ("migrate", "reconcile") and item.expect == "lightpath":
                # Prepared on every live node (or --no-handover: at once): the handoff label lands -- and the
                # mark goes -- in one write, ours: the webhook would mark a Service that becomes wanted on an
                # UPDATE and leaves the label of a marked one to its driver (docs/migration.md).
                meta = dict(patch.get("metadata") or {})
                meta["labels"] = {**(meta.get("labels") or {}), c.SERVICE_PROXY_NAME_LABEL: self.config.proxy_name}
                if self.handover:
                    meta["annotations"] = {**(meta.get("annotations") or {}), c.HANDOVER_ANNOTATION: None}
                    if item.ref in self.versions:  # unchanged since our mark, or a later intent wins
                        meta["resourceVersion"] = self.versions.pop(item.ref)
                patch = {**patch, "metadata": meta}
                report.paths[item.ref] = "handover" if self.handover else "direct"
            try:
                uids[item.ref] = events.uid_of(self.cluster.patch_service(item.ref.namespace, item.ref.name, patch))
            except ClusterError as exc:
                guarded = "resourceVersion" in (patch.get("metadata") or {}) and "409" in str(exc)
                why = ("changed by someone else since it was marked (a rollback at the same time?): not labelled, "
                       f"the later change wins ({exc})") if guarded else str(exc)
                report.failures.append((item.ref, f"{item.ref}: {why}"))
                self.say(f"FAILED    {item.ref} (see the error below)")
                if not self.continue_on_error:
                    stop = True
                    # The rest of this batch was never written: report it, or it vanishes from the counts.
                    rest = chunk[chunk.index(item) + 1 :]
                    report.not_attempted.extend(i.ref for i in rest)
                    break
                continue
            written.append(item)
            report.changed.append(item.ref)
        for item, problem in self._verify(written, report):
            if problem is None:
                report.verified.append(item.ref)
                # Rounded once, here: the line below, the Event and the JSON report give the same figure.
                seconds = report.durations[item.ref] = round(time.monotonic() - started, 3)
                how = f" ({report.paths[item.ref]})" if item.ref in report.paths else ""
                self.say(f"{PAST.get(verb, verb):<9} {item.ref} -> {display_handler(item.expect)}{how} "
                         f"in {seconds:.2f}s")
                self._done(verb, item, uids.get(item.ref), seconds, agents)
            else:
                report.failures.append((item.ref, problem))
                self.say(f"FAILED    {item.ref} (see the error below)")
                stop = stop or not self.continue_on_error
        return stop

    def _done(self, verb: str, item: Item, uid: str | None, seconds: float, agents: int | None) -> None:
        """The closing Event on a Service that moved: Migrated (with the handover's duration) or RolledBack."""
        if self.recorder is None:
            return
        if item.expect == LIGHTPATH:
            message = events.migrated_message(self.config.proxy_name, seconds, verb,
                                              agents if self.handover else None, handover=self.handover)
            self.recorder.emit(item.ref, uid, c.EVENT_MIGRATED, c.EVENT_NORMAL, message)
        elif item.expect == KUBE_PROXY:
            self.recorder.emit(item.ref, uid, c.EVENT_ROLLED_BACK, c.EVENT_NORMAL,
                               events.rolled_back_message(seconds, verb))

    def _read(self, item: Item) -> str | None:
        """Read the Service back and verify it: None when it is where the plan said, else the problem."""
        try:
            service = self.cluster.get_service(item.ref.namespace, item.ref.name)
        except ClusterError as exc:
            return f"{item.ref}: cannot read it back: {exc}"
        return verify(item, service, self.ns_labels.get(item.ref.namespace, {}), self.config)

    def _verify(self, written: Sequence[Item], report: Report) -> list[tuple[Item, str | None]]:
        results: dict[Ref, str | None] = {}
        for item in written:
            results[item.ref] = self._read(item)
        # Namespace mode: the webhook may judge with a Namespace cache a moment behind; touch again until a deadline.
        deadline = time.monotonic() + self.verify_timeout
        lagging = [i for i in written if i.settle and results[i.ref] is not None]
        while lagging and time.monotonic() < deadline:
            self.sleep(0.1)
            for item in lagging:
                try:
                    self.cluster.patch_service(item.ref.namespace, item.ref.name, touch_patch(self.now()))
                except ClusterError as exc:
                    results[item.ref] = f"{item.ref}: {exc}"
                    continue
                results[item.ref] = self._read(item)
            lagging = [i for i in lagging if results[i.ref] is not None]
        # Reconcile: the webhook did not act, so write the handoff label the policy wants ourselves.
        for item in written:
            if item.fallback is None:
                continue
            if results[item.ref] is None:
                report.paths.setdefault(item.ref, "webhook")
                continue
            try:
                self.cluster.patch_service(item.ref.namespace, item.ref.name, item.fallback)
                results[item.ref] = self._read(item)
            except ClusterError as exc:
                results[item.ref] = f"{item.ref}: direct write of the handoff label failed: {exc}"
            if results[item.ref] is None:
                report.paths[item.ref] = "direct"
        return [(i, results[i.ref]) for i in written]


def summary_lines(report: Report) -> list[str]:
    """The closing lines: counts, and on failure exactly which Services were changed."""
    aborted = f", {len(report.aborted)} handover(s) aborted" if report.aborted else ""
    lines = [
        f"{report.verb}: {len(report.verified)} done, {len(report.unchanged)} unchanged, "
        f"{len(report.skipped)} skipped, {len(report.failures)} failed, {len(report.not_attempted)} not attempted"
        f"{aborted} in {report.seconds:.2f}s"
    ]
    if report.namespaces_changed:
        lines.append("Namespaces labelled: " + ", ".join(r.name for r in report.namespaces_changed))
    if not report.ok:
        changed = ", ".join(str(r) for r in report.changed) or "none"
        lines.append(f"Services changed (written) before stopping: {changed}")
        if report.not_attempted:
            lines.append(f"Not attempted: {len(report.not_attempted)} (re-run the same command to continue)")
        if report.interrupted:
            lines.append("Interrupted.")
    return lines
