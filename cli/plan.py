"""What migrate, rollback and reconcile would do, and how to tell whether it worked (pure).

Every expectation comes from ``shared.policy.decide`` run on the object as it WILL look after our
write: "would the webhook leave this Service on lightpath once it carries lightpath.cloud/proxy=enabled?"
So the plan never disagrees with the webhook, and a Service the policy refuses (UDP, headless, excluded,
other proxy…) is skipped with the policy's own reason instead of being written and then failing.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cli.rows import KUBE_PROXY, LIGHTPATH, Ref, display_handler, labels_of, outcome, ref_of
from shared import constants as c
from shared.policy import Action, PolicyConfig, decide, handled_by

# Written by a "touch": an UPDATE that changes nothing the policy reads, so the webhook runs again.
TOUCH_ANNOTATION = "lightpath.cloud/reconciled-at"


class Direction(enum.StrEnum):
    MIGRATE = "migrate"
    ROLLBACK = "rollback"

    @property
    def opt_value(self) -> str:
        return c.OPT_ENABLED if self is Direction.MIGRATE else c.OPT_DISABLED

    @property
    def target(self) -> str:
        return LIGHTPATH if self is Direction.MIGRATE else KUBE_PROXY


class Step(enum.StrEnum):
    LABEL = "label"  # write lightpath.cloud/proxy (the webhook adds/removes the handoff label on that UPDATE)
    TOUCH = "touch"  # label already right but the handoff is not: re-run the webhook with an annotation write
    UNCHANGED = "unchanged"
    SKIP = "skip"


@dataclass(frozen=True)
class Item:
    """One Service (or Namespace) in a plan."""

    ref: Ref
    step: Step
    reason: str
    expect: str  # who serves it after the step ("lightpath", "kube-proxy", "other:<name>")
    patch: dict[str, Any] | None = None
    opt: str | None = None  # lightpath.cloud/proxy value the Service must carry afterwards (Service mode)
    settle: bool = False  # verification may need re-touching (the webhook's Namespace cache can lag)
    fallback: dict[str, Any] | None = None  # reconcile: direct handoff-label write if the webhook did not act

    @property
    def actionable(self) -> bool:
        return self.step in (Step.LABEL, Step.TOUCH)


@dataclass(frozen=True)
class Plan:
    verb: str  # "migrate", "rollback" or "reconcile"
    services: tuple[Item, ...]
    namespaces: tuple[Item, ...] = ()

    def count(self, step: Step) -> int:
        return sum(i.step is step for i in self.services)

    @property
    def writes(self) -> int:
        return sum(i.actionable for i in (*self.namespaces, *self.services))


def label_patch(key: str, value: str | None) -> dict[str, Any]:
    """The minimal JSON merge patch of one label (None deletes it)."""
    return {"metadata": {"labels": {key: value}}}


def touch_patch(now: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {TOUCH_ANNOTATION: now}}}


def _with_label(obj: Mapping[str, Any], key: str, value: str) -> dict[str, Any]:
    out = copy.deepcopy(dict(obj))
    meta = out.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), key: value}
    return out


def plan_service(
    direction: Direction,
    service: Mapping[str, Any],
    ns_labels: Mapping[str, str],
    config: PolicyConfig,
    now: str,
) -> Item:
    """One Service in Service mode: set its own lightpath.cloud/proxy label."""
    ref = ref_of(service)
    current = decide(service, ns_labels, config)
    after = decide(_with_label(service, c.OPT_LABEL, direction.opt_value), ns_labels, config)
    expect = outcome(after)
    if expect != direction.target:
        return Item(ref, Step.SKIP, after.reason, current.handled_by)
    opt_now = labels_of(service).get(c.OPT_LABEL)
    already = f"already on {display_handler(direction.target)}"
    meta = service.get("metadata") or {}
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    if direction is Direction.ROLLBACK and isinstance(annotations, Mapping) and c.HANDOVER_ANNOTATION in annotations:
        # A migration under way (someone else's): the later intent wins. Opting out AND removing the mark
        # changes the Service, so that migration's final write (guarded by resourceVersion) fails cleanly.
        patch = label_patch(c.OPT_LABEL, direction.opt_value)
        patch["metadata"]["annotations"] = {c.HANDOVER_ANNOTATION: None}
        return Item(ref, Step.LABEL, f"migration in progress stopped: {after.reason}", expect, patch,
                    direction.opt_value)
    if (
        direction is Direction.ROLLBACK
        and current.handled_by == KUBE_PROXY
        and opt_now != c.OPT_ENABLED
        and (current.wants_proxy is not True)
    ):
        return Item(ref, Step.UNCHANGED, f"{already}: {current.reason}", KUBE_PROXY)
    if opt_now == direction.opt_value:
        if current.handled_by == direction.target:
            return Item(ref, Step.UNCHANGED, already, expect, opt=direction.opt_value)
        return Item(
            ref, Step.TOUCH, f"PENDING: {after.reason}", expect, touch_patch(now), opt=direction.opt_value
        )
    return Item(
        ref,
        Step.LABEL,
        after.reason,
        expect,
        label_patch(c.OPT_LABEL, direction.opt_value),
        direction.opt_value,
    )


def plan_services(
    direction: Direction,
    services: Iterable[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    config: PolicyConfig,
    now: str,
) -> Plan:
    items = [
        plan_service(direction, s, namespaces.get(ref_of(s).namespace, {}), config, now) for s in services
    ]
    return Plan(str(direction), tuple(items))


def plan_namespaces(
    direction: Direction,
    selected: Sequence[str],
    services: Iterable[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    config: PolicyConfig,
    now: str,
) -> Plan:
    """Namespace mode: label the Namespaces, then touch each Service the new label moves (the webhook only
    runs on Service writes, so a Namespace label alone moves nothing until each Service is updated)."""
    ns_items: list[Item] = []
    svc_items: list[Item] = []
    by_ns: dict[str, list[Mapping[str, Any]]] = {}
    for s in services:
        by_ns.setdefault(ref_of(s).namespace, []).append(s)
    for ns in selected:
        ref = Ref("", ns)
        labels = dict(namespaces.get(ns, {}))
        if ns in config.excluded_namespaces:
            ns_items.append(Item(ref, Step.SKIP, f"namespace {ns} is excluded", direction.target))
            continue
        if labels.get(c.OPT_LABEL) == direction.opt_value:
            ns_items.append(
                Item(ref, Step.UNCHANGED, f"already {c.OPT_LABEL}={direction.opt_value}", direction.target)
            )
        else:
            patch = label_patch(c.OPT_LABEL, direction.opt_value)
            ns_items.append(
                Item(ref, Step.LABEL, f"set {c.OPT_LABEL}={direction.opt_value}", direction.target, patch)
            )
        new_labels = {**labels, c.OPT_LABEL: direction.opt_value}
        for s in sorted(by_ns.get(ns, []), key=ref_of):
            after = decide(s, new_labels, config)
            expect = outcome(after)
            now_by = handled_by(labels_of(s).get(c.SERVICE_PROXY_NAME_LABEL), config.proxy_name)
            if expect != direction.target:
                svc_items.append(Item(ref_of(s), Step.SKIP, after.reason, now_by))
            elif now_by == expect:
                svc_items.append(
                    Item(ref_of(s), Step.UNCHANGED, f"already on {display_handler(expect)}", expect)
                )
            else:
                svc_items.append(
                    Item(ref_of(s), Step.TOUCH, after.reason, expect, touch_patch(now), settle=True)
                )
    return Plan(str(direction), tuple(svc_items), tuple(ns_items))


def plan_reconcile(
    services: Iterable[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    config: PolicyConfig,
    now: str,
) -> Plan:
    """Every PENDING Service: touch it so the webhook decides again; fall back to the label the policy wants."""
    items = []
    for s in services:
        d = decide(s, namespaces.get(ref_of(s).namespace, {}), config)
        if d.action is Action.LEAVE:
            continue
        value = config.proxy_name if d.action is Action.LABEL else None
        items.append(
            Item(
                ref_of(s),
                Step.TOUCH,
                d.reason,
                outcome(d),
                touch_patch(now),
                fallback=label_patch(c.SERVICE_PROXY_NAME_LABEL, value),
            )
        )
    return Plan("reconcile", tuple(items))


def verify(
    item: Item, service: Mapping[str, Any] | None, ns_labels: Mapping[str, str], config: PolicyConfig
) -> str | None:
    """None when the Service read back is where the plan said it would be, else a message naming it."""
    if service is None:
        return f"{item.ref}: Service not found when reading it back (deleted meanwhile?)"
    labels = labels_of(service)
    if item.opt is not None and labels.get(c.OPT_LABEL) != item.opt:
        found = labels.get(c.OPT_LABEL)
        return (
            f"{item.ref}: label {c.OPT_LABEL} is {found!r}, expected {item.opt!r} "
            "(changed concurrently by someone else?)"
        )
    actual = handled_by(labels.get(c.SERVICE_PROXY_NAME_LABEL), config.proxy_name)
    if actual == item.expect:
        return None
    handoff = f"{c.SERVICE_PROXY_NAME_LABEL}={config.proxy_name}"
    if item.expect == LIGHTPATH:
        what = f"the handoff label {handoff} did not land"
    elif actual == LIGHTPATH:
        what = f"the handoff label {handoff} is still there"
    else:
        what = f"it is served by {display_handler(actual)}"
    policy = decide(service, ns_labels, config).reason
    return (
        f"{item.ref}: expected {display_handler(item.expect)}, but {what}: the webhook did not act on the "
        f"update (is it running and registered? does it use the same --proxy-name/--mode?). Policy says: {policy}"
    )
