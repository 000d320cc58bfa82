"""The CLI end to end: real main(argv) -> official kubernetes client -> sandbox API server (test double)
-> the real webhook over TLS, which adds/removes the handoff label on each Service UPDATE."""

from __future__ import annotations

import json

import jsonschema
import yaml

from cli.execute import Runner, now_stamp, summary_lines
from cli.kube import Cluster as KubeCluster
from cli.plan import TOUCH_ANNOTATION, Direction, plan_services
from shared import constants as c
from shared.policy import PolicyConfig
from tests.cli.cluster import DISABLED, ENABLED, mixed_cluster, namespace, port, service
from tests.cli.conftest import Cluster
from tests.cli.schema import STATUS_SCHEMA

OURS = c.DEFAULT_PROXY_NAME


def _rows(result_out: str) -> dict[str, dict]:
    doc = json.loads(result_out)
    return {f"{i['namespace']}/{i['name']}": i for i in doc["items"]}


def test_status_rows_for_a_mixed_cluster(cluster: Cluster) -> None:
    namespaces, services = mixed_cluster()
    # Opted in at CREATE: the webhook labels it on admission.
    services.append(service("cart", "shop", port(80, name="http", app="http"), labels=ENABLED))
    cluster.create(namespaces, services)
    assert cluster.handoff("shop", "cart") == OURS

    result = cluster.run("status", "-A", "-o", "json")
    assert result.code == 0, result.err
    jsonschema.validate(json.loads(result.out), STATUS_SCHEMA)
    rows = _rows(result.out)
    assert len(rows) == 8
    assert rows["shop/cart"]["handledBy"] == "lightpath" and rows["shop/cart"]["portsText"] == "80/TCP(http)"
    assert rows["shop/web"]["handledBy"] == "kube-proxy" and "not opted in" in rows["shop/web"]["reason"]
    assert rows["shop/api"]["portsText"] == "8080/TCP(http),8443/TCP(http)"
    assert rows["infra/dns"]["portsText"] == "53/UDP" and "dns/UDP 53" in rows["infra/dns"]["reason"]
    assert rows["infra/dns-mixed"]["portsText"] == "53/TCP,53/UDP" and not rows["infra/dns-mixed"]["eligible"]
    assert "headless" in rows["shop/db"]["reason"]
    assert rows["shop/mesh"]["handledBy"] == "other:cilium"
    assert "excluded" in rows["kube-system/metrics"]["reason"]
    assert not any(r["pending"] for r in rows.values())
    assert json.loads(result.out)["summary"] == {
        "total": 8,
        "lightpath": 1,
        "kubeProxy": 6,
        "otherProxy": 1,
        "pending": 0,
        "ineligible": 5,
    }

    table = cluster.run("status", "-A")
    assert table.code == 0 and "\033[" not in table.out  # piped: plain
    assert table.out.splitlines()[0].split() == [
        "NAMESPACE",
        "NAME",
        "TYPE",
        "PORTS",
        "HANDLED-BY",
        "WANTS",
        "PENDING",
        "REASON",
    ]
    assert table.out.rstrip().splitlines()[-1].startswith("8 Services: 1 on lightpath, 6 on kube-proxy")
    assert yaml.safe_load(cluster.run("status", "-n", "infra", "-o", "yaml").out)["summary"]["total"] == 2
    coloured = cluster.run("status", "-n", "shop", "--color", "always")
    assert "\033[32mlightpath\033[0m" in coloured.out


def test_migrate_by_name_then_rollback(cluster: Cluster) -> None:
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)

    result = cluster.run("migrate", "shop/web", "api", "-n", "shop")
    assert result.code == 0, result.err
    assert "migrated  shop/web -> lightpath" in result.out and "migrated  shop/api -> lightpath" in result.out
    assert cluster.handoff("shop", "web") == OURS and cluster.handoff("shop", "api") == OURS
    assert cluster.labels("shop", "web")[c.OPT_LABEL] == c.OPT_ENABLED
    assert cluster.handoff("shop", "mesh") == "cilium"

    before = cluster.resource_versions()
    again = cluster.run("migrate", "shop/web", "shop/api")  # idempotent: nothing to write
    assert again.code == 0 and "2 unchanged" in again.out
    assert cluster.resource_versions() == before

    back = cluster.run("rollback", "-A")
    assert back.code == 0, back.err
    assert "rolled back shop/web -> kube-proxy" in back.out
    status = _rows(cluster.run("status", "-A", "-o", "json").out)
    assert {k for k, r in status.items() if r["handledBy"] == "lightpath"} == set()
    assert status["shop/web"]["wants"] == "kube-proxy" and not any(r["pending"] for r in status.values())
    assert cluster.labels("shop", "web")[c.OPT_LABEL] == c.OPT_DISABLED
    assert status["shop/mesh"]["handledBy"] == "other:cilium"  # another proxy's Service is never touched


def test_migrate_skips_what_the_policy_refuses(cluster: Cluster) -> None:
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)
    before = cluster.resource_versions()

    result = cluster.run(
        "migrate", "infra/dns", "infra/dns-mixed", "shop/db", "shop/mesh", "kube-system/metrics"
    )
    assert result.code == 0, result.err
    assert "5 skipped" in result.out and "dns/UDP 53" in result.out and "headless" in result.out
    assert cluster.resource_versions() == before


def test_migrate_a_namespace_in_batches(cluster: Cluster) -> None:
    cluster.create([namespace("shop")], [service(f"svc{i}", "shop") for i in range(7)])
    result = cluster.run("migrate", "-n", "shop", "--batch", "3", "-o", "json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["ok"] and len(report["verified"]) == 7 and report["failed"] == []
    assert all(cluster.handoff("shop", f"svc{i}") == OURS for i in range(7))


def test_migrate_with_namespace_label(cluster: Cluster) -> None:
    cluster.create(
        [namespace("shop"), namespace("team")],
        [
            service("web", "shop"),
            service("api", "shop"),
            service("pinned", "shop", labels=DISABLED),
            service("dns", "shop", port(53, "UDP")),
            service("other", "team"),
        ],
    )
    result = cluster.run("migrate", "shop", "--namespace-label")
    assert result.code == 0, result.err
    assert "labelled  namespace shop lightpath.cloud/proxy=enabled" in result.out
    ns = cluster.core.read_namespace("shop")
    assert ns.metadata.labels[c.OPT_LABEL] == c.OPT_ENABLED
    assert cluster.handoff("shop", "web") == OURS and cluster.handoff("shop", "api") == OURS
    assert c.OPT_LABEL not in cluster.labels("shop", "web")  # the Namespace label did it
    assert TOUCH_ANNOTATION in (
        cluster.core.read_namespaced_service("web", "shop").metadata.annotations or {}
    )
    assert cluster.handoff("shop", "pinned") is None and cluster.handoff("shop", "dns") is None
    assert cluster.handoff("team", "other") is None

    back = cluster.run("rollback", "-n", "shop", "--namespace-label")
    assert back.code == 0, back.err
    assert cluster.handoff("shop", "web") is None and cluster.handoff("shop", "api") is None


def test_batch_verification_stops_when_the_webhook_is_down(cluster: Cluster) -> None:
    """A migration writes the handoff label itself (after the handover), so it needs no webhook; a rollback
    only opts out and the webhook takes the label away: with the webhook down that is verified and stops."""
    cluster.create([namespace("shop")], [service(f"svc{i}", "shop") for i in range(6)])
    first = cluster.run("migrate", "-n", "shop")
    assert first.code == 0 and all(cluster.handoff("shop", f"svc{i}") == OURS for i in range(6))
    back = cluster.run("rollback", "shop/svc0", "shop/svc1")
    assert back.code == 0
    cluster.stop_webhook()
    direct = cluster.run("migrate", "shop/svc0", "--no-handover")  # labelled at once, by the CLI
    assert direct.code == 0 and cluster.handoff("shop", "svc0") == OURS, direct.err

    result = cluster.run("rollback", "-n", "shop", "--batch", "2")
    assert result.code == 1
    # svc1 is already back; the first batch written while the webhook is down is svc0, svc2.
    assert "shop/svc0: expected kube-proxy" in result.err, result.err
    assert "Services changed (written) before stopping: shop/svc0, shop/svc2" in result.out, result.out
    assert "Not attempted: 3" in result.out
    assert cluster.labels("shop", "svc3").get(c.OPT_LABEL) == c.OPT_ENABLED  # the run stopped before svc3
    assert cluster.handoff("shop", "svc0") == OURS

    status = _rows(cluster.run("status", "-n", "shop", "-o", "json").out)
    assert status["shop/svc0"]["pending"] and status["shop/svc2"]["pending"] and not status["shop/svc3"]["pending"]

    keep_going = cluster.run("rollback", "-n", "shop", "--continue-on-error", "-o", "json")
    report = json.loads(keep_going.out)
    assert keep_going.code == 1 and {f["service"] for f in report["failed"]} == {
        f"shop/svc{i}" for i in (0, 2, 3, 4, 5)
    }

    cluster.start_webhook()
    healed = cluster.run("rollback", "-n", "shop")  # re-run: pending Services are touched, the rest unchanged
    assert healed.code == 0, healed.err
    assert all(cluster.handoff("shop", f"svc{i}") is None for i in range(6))


def test_write_failure_mid_batch_reports_the_rest_of_the_batch_as_not_attempted(cluster: Cluster) -> None:
    """A Service deleted between planning and writing fails its patch; the run stops there and the
    Services of the same batch after it are reported as not attempted (and left untouched)."""
    cluster.create([namespace("shop")], [service(f"svc{i}", "shop") for i in range(4)])
    kube = KubeCluster(cluster.api.api_client())
    listed = kube.list_services("shop")
    plan = plan_services(Direction.MIGRATE, listed, {"shop": {}}, PolicyConfig(), now_stamp())
    cluster.core.delete_namespaced_service("svc1", "shop")
    lines: list[str] = []
    report = Runner(kube, PolicyConfig(), {"shop": {}}, lines.append, batch=10).run(plan)
    assert [str(r) for r in report.verified] == ["shop/svc0"]
    assert [str(r) for r, _ in report.failures] == ["shop/svc1"] and "404" in report.failures[0][1]
    assert [str(r) for r in report.not_attempted] == ["shop/svc2", "shop/svc3"]
    assert "1 done, 0 unchanged, 0 skipped, 1 failed, 2 not attempted" in summary_lines(report)[0]
    assert all(c.OPT_LABEL not in cluster.labels("shop", f"svc{i}") for i in (2, 3))


def test_reconcile_fixes_services_created_while_the_webhook_was_down(cluster: Cluster) -> None:
    cluster.create([namespace("shop", ENABLED)], [service("early", "shop")])
    assert cluster.handoff("shop", "early") == OURS
    cluster.stop_webhook()
    cluster.create(
        [],
        [
            service("late", "shop"),
            service("late-udp", "shop", port(53, "UDP")),
            service("pinned", "shop", labels=ENABLED),
        ],
    )
    assert cluster.handoff("shop", "late") is None

    dry = cluster.run("reconcile", "-A", "--dry-run")
    assert dry.code == 0 and "shop/late" in dry.out and "shop/pinned" in dry.out and "late-udp" not in dry.out
    assert cluster.handoff("shop", "late") is None

    # Webhook still down: reconcile hands the Service over itself (mark, every live agent, then the label),
    # as migrate does; with --no-handover the touch does nothing and it writes the handoff label directly.
    direct = cluster.run("reconcile", "-n", "shop", "--no-handover")
    assert direct.code == 0, direct.err
    assert "reconciled shop/late -> lightpath (direct)" in direct.out
    assert cluster.handoff("shop", "late") == OURS and cluster.handoff("shop", "late-udp") is None

    # Webhook back: a Service admitted while it was down is fixed by the webhook itself on the touch.
    cluster.create([], [service("latest", "shop")])
    cluster.start_webhook()
    via_webhook = cluster.run("reconcile", "-A", "-o", "json")
    report = json.loads(via_webhook.out)  # the CLI drives the handover (no agent reports: label at once)
    assert via_webhook.code == 0 and report["paths"] == {"shop/latest": "handover"}
    assert c.HANDOVER_ANNOTATION not in (cluster.core.read_namespaced_service("latest", "shop").metadata.annotations or {})
    assert cluster.handoff("shop", "latest") == OURS
    assert not any(r["pending"] for r in _rows(cluster.run("status", "-A", "-o", "json").out).values())


def test_unknown_names_change_nothing(cluster: Cluster) -> None:
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)
    before = cluster.resource_versions()
    for argv in (
        ("migrate", "shop/web", "shop/nope", "ghost/web"),
        ("migrate", "-n", "ghost"),
        ("rollback", "ghost", "--namespace-label"),
        ("status", "-n", "ghost"),
        ("reconcile", "-n", "ghost"),
    ):
        result = cluster.run(*argv)
        assert result.code == 2, argv
        assert "not found" in result.err and "nothing was changed" in result.err
    assert (
        "Services not found: shop/nope, ghost/web"
        in cluster.run("migrate", "shop/web", "shop/nope", "ghost/web").err
    )
    assert cluster.resource_versions() == before


def test_dry_run_and_plan_change_nothing(cluster: Cluster) -> None:
    namespaces, services = mixed_cluster()
    cluster.create(namespaces, services)
    before = cluster.resource_versions()
    plan = cluster.run("plan", "-A", "-o", "json")
    assert plan.code == 0
    actions = {(s["namespace"], s["name"]): s["action"] for s in json.loads(plan.out)["services"]}
    assert actions[("shop", "web")] == "label" and actions[("infra", "dns")] == "skip"
    dry = cluster.run("migrate", "-A", "--dry-run")
    assert dry.code == 0 and "(dry run: nothing was changed)" in dry.out
    assert cluster.run("rollback", "-A", "--dry-run").code == 0
    assert cluster.run("migrate", "shop", "--namespace-label", "--dry-run").code == 0
    assert cluster.resource_versions() == before
    assert c.OPT_LABEL not in (cluster.core.read_namespace("shop").metadata.labels or {})


def test_emergency_rollback_while_the_webhook_is_down(cluster: Cluster) -> None:
    cluster.create(
        [namespace("shop")], [service("web", "shop", labels=ENABLED), service("api", "shop", labels=ENABLED)]
    )
    assert cluster.handoff("shop", "web") == OURS and cluster.handoff("shop", "api") == OURS
    cluster.stop_webhook()

    stuck = cluster.run("rollback", "-n", "shop", "--continue-on-error")
    assert stuck.code == 1
    assert (
        "shop/api: expected kube-proxy, but the handoff label service.kubernetes.io/service-proxy-name=lightpath.cloud is still there"
        in stuck.err
    )
    assert "Services changed (written) before stopping: shop/api, shop/web" in stuck.out

    # The webhook does not act on the touch, so reconcile removes the handoff label directly.
    fixed = cluster.run("reconcile", "-n", "shop")
    assert fixed.code == 0, fixed.err
    assert "reconciled shop/web -> kube-proxy (direct)" in fixed.out
    assert cluster.handoff("shop", "web") is None and cluster.handoff("shop", "api") is None


def test_reconcile_reports_a_webhook_that_disagrees_with_the_cli_config(cluster: Cluster) -> None:
    cluster.create([namespace("shop")], [service("web", "shop")])
    # The CLI is told opt-out, the webhook runs opt-in: the direct write is undone by the webhook on that UPDATE.
    result = cluster.run("--mode", "opt-out", "reconcile", "-n", "shop")
    assert result.code == 1
    assert "shop/web: expected lightpath" in result.err and "same --proxy-name/--mode" in result.err
    assert cluster.handoff("shop", "web") is None
