"""Plans: what migrate/rollback/reconcile would write, what they skip and why, and how success is judged."""

from __future__ import annotations

from typing import Any

from cli.plan import (
    TOUCH_ANNOTATION,
    Direction,
    Step,
    label_patch,
    plan_namespaces,
    plan_reconcile,
    plan_services,
    verify,
)
from cli.rows import namespace_labels
from shared import constants as c
from shared.policy import PolicyConfig
from tests.cli.cluster import DISABLED, ENABLED, LABELLED, mixed_cluster, service

CFG = PolicyConfig()
NOW = "2024-01-01T00:00:00Z"


def _by_name(plan: Any) -> dict[str, Any]:
    return {i.ref.name: i for i in plan.services}


def test_migrate_plan_for_a_mixed_cluster() -> None:
    namespaces, services = mixed_cluster()
    items = _by_name(plan_services(Direction.MIGRATE, services, namespace_labels(namespaces), CFG, NOW))

    assert items["web"].step is Step.LABEL and items["api"].step is Step.LABEL
    assert items["web"].patch == {"metadata": {"labels": {c.OPT_LABEL: c.OPT_ENABLED}}}
    assert items["web"].expect == "lightpath" and items["web"].opt == c.OPT_ENABLED
    skipped = {name: i.reason for name, i in items.items() if i.step is Step.SKIP}
    assert set(skipped) == {"dns", "dns-mixed", "db", "mesh", "metrics"}
    assert "dns/UDP 53" in skipped["dns"] and "dns/UDP 53" in skipped["dns-mixed"]
    assert "headless" in skipped["db"]
    assert "another proxy (cilium)" in skipped["mesh"]
    assert "excluded" in skipped["metrics"]
    assert all(i.patch is None for i in items.values() if i.step is Step.SKIP)


def test_migrate_is_idempotent_and_retriggers_pending() -> None:
    done = service("done", labels={**ENABLED, **LABELLED})
    pending = service("pending", labels=ENABLED)  # label written while the webhook was down
    items = _by_name(plan_services(Direction.MIGRATE, [done, pending], {}, CFG, NOW))

    assert items["done"].step is Step.UNCHANGED and items["done"].patch is None
    assert items["pending"].step is Step.TOUCH
    assert items["pending"].patch == {"metadata": {"annotations": {TOUCH_ANNOTATION: NOW}}}
    assert items["pending"].expect == "lightpath"


def test_migrate_pins_a_service_already_moved_by_its_namespace() -> None:
    moved = service("web", labels=LABELLED)
    item = plan_services(Direction.MIGRATE, [moved], {"shop": ENABLED}, CFG, NOW).services[0]
    assert item.step is Step.LABEL and item.expect == "lightpath"


def test_rollback_plan() -> None:
    items = _by_name(
        plan_services(
            Direction.ROLLBACK,
            [
                service("moved", labels={**ENABLED, **LABELLED}),
                service("by-namespace", "team", labels=LABELLED),
                service("never", labels={}),
                service("opted-udp", labels=ENABLED),
                service("stuck", labels={**DISABLED, **LABELLED}),
                service("mesh", labels={c.SERVICE_PROXY_NAME_LABEL: "cilium"}),
            ],
            {"team": ENABLED},
            CFG,
            NOW,
        )
    )
    assert items["moved"].step is Step.LABEL and items["moved"].expect == "kube-proxy"
    assert items["moved"].patch == {"metadata": {"labels": {c.OPT_LABEL: c.OPT_DISABLED}}}
    assert items["by-namespace"].step is Step.LABEL
    assert items["never"].step is Step.UNCHANGED and "already on kube-proxy" in items["never"].reason
    assert items["opted-udp"].step is Step.LABEL  # an opt-in label stays a pending migration: clear it
    assert items["stuck"].step is Step.TOUCH
    assert items["mesh"].step is Step.SKIP and "cilium" in items["mesh"].reason


def test_namespace_mode_labels_namespaces_then_touches_services() -> None:
    svcs = [
        service("web", "shop"),
        service("dns", "shop", {"name": "dns", "port": 53, "protocol": "UDP"}),
        service("pinned-out", "shop", labels=DISABLED),
        service("done", "shop", labels=LABELLED),
        service("other", "elsewhere"),
    ]
    plan = plan_namespaces(Direction.MIGRATE, ["shop", "kube-system"], svcs, {"shop": {}}, CFG, NOW)

    ns = {i.ref.name: i for i in plan.namespaces}
    assert ns["shop"].step is Step.LABEL and ns["shop"].patch == label_patch(c.OPT_LABEL, c.OPT_ENABLED)
    assert ns["kube-system"].step is Step.SKIP and "excluded" in ns["kube-system"].reason
    items = _by_name(plan)
    assert set(items) == {"web", "dns", "pinned-out", "done"}
    assert (
        items["web"].step is Step.TOUCH
        and items["web"].settle
        and "namespace opted in" in items["web"].reason
    )
    assert items["dns"].step is Step.SKIP
    assert items["pinned-out"].step is Step.SKIP and "Service opted out" in items["pinned-out"].reason
    assert items["done"].step is Step.UNCHANGED


def test_namespace_mode_rollback_respects_service_opt_in() -> None:
    svcs = [
        service("web", "shop", labels=LABELLED),
        service("pinned", "shop", labels={**ENABLED, **LABELLED}),
    ]
    plan = plan_namespaces(Direction.ROLLBACK, ["shop"], svcs, {"shop": ENABLED}, CFG, NOW)
    items = _by_name(plan)
    assert plan.namespaces[0].patch == label_patch(c.OPT_LABEL, c.OPT_DISABLED)
    assert items["web"].step is Step.TOUCH and items["web"].expect == "kube-proxy"
    assert items["pinned"].step is Step.SKIP and "Service opted in" in items["pinned"].reason


def test_reconcile_plans_only_pending_services_with_a_direct_fallback() -> None:
    namespaces, services = mixed_cluster()
    services += [
        service("late", "shop", labels=ENABLED),
        service("gone-udp", "shop", {"name": "dns", "port": 53, "protocol": "UDP"}, labels=LABELLED),
    ]
    plan = plan_reconcile(services, namespace_labels(namespaces), CFG, NOW)
    items = _by_name(plan)
    assert set(items) == {"late", "gone-udp"}
    assert items["late"].expect == "lightpath"
    assert items["late"].fallback == label_patch(c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME)
    assert items["gone-udp"].expect == "kube-proxy"
    assert items["gone-udp"].fallback == {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}}}


def test_verify_names_the_service_and_the_missing_label() -> None:
    item = plan_services(Direction.MIGRATE, [service("web")], {}, CFG, NOW).services[0]
    assert verify(item, service("web", labels={**ENABLED, **LABELLED}), {}, CFG) is None

    problem = verify(item, service("web", labels=ENABLED), {}, CFG)
    assert problem is not None and problem.startswith("shop/web: expected lightpath")
    assert f"{c.SERVICE_PROXY_NAME_LABEL}={c.DEFAULT_PROXY_NAME} did not land" in problem

    concurrent = verify(item, service("web", labels={**DISABLED}), {}, CFG)
    assert concurrent is not None and "changed concurrently" in concurrent
    assert "not found" in (verify(item, None, {}, CFG) or "")


def test_verify_rollback_reports_label_still_there() -> None:
    item = plan_services(Direction.ROLLBACK, [service("web", labels=LABELLED)], {}, CFG, NOW).services[0]
    problem = verify(item, service("web", labels={**DISABLED, **LABELLED}), {}, CFG)
    assert problem is not None and "is still there" in problem


def test_namespace_unknown_to_the_plan_is_judged_without_labels() -> None:
    plan = plan_services(Direction.MIGRATE, [service("web", "ghost")], {}, CFG, NOW)
    assert plan.services[0].step is Step.LABEL and plan.writes == 1
