"""One function per command: load what is needed (one list per resource), plan (pure), act, print.

Exit codes: 0 success, 1 a failure talking to the cluster or a Service that did not end where it should,
2 bad input (unknown Service/namespace, bad flags) with nothing changed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from cli import events, render
from cli.execute import Report, Runner, now_stamp, summary_lines
from cli.kube import Cluster, ClusterError, connect
from cli.plan import Direction, Plan, plan_namespaces, plan_reconcile, plan_services
from cli.rows import build_rows, namespace_labels, summarize
from cli.selection import Selection, check_namespaces, select_namespaces, select_services
from shared import constants as c
from shared.agents import Traffic, traffic
from shared.policy import PolicyConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    excluded = frozenset(n.strip() for n in args.excluded_namespaces.split(",") if n.strip())
    return PolicyConfig(proxy_name=args.proxy_name, mode=args.mode, excluded_namespaces=excluded)


def _selection(args: argparse.Namespace, default_namespace: str) -> Selection:
    return Selection(
        names=tuple(getattr(args, "names", ()) or ()),
        namespace=args.namespace,
        all_namespaces=args.all_namespaces,
        default_namespace=default_namespace,
    )


def _connect(args: argparse.Namespace, *, require_explicit: bool) -> tuple[Cluster, Selection, PolicyConfig]:
    """Check the command line (selection, policy flags) BEFORE talking to the cluster, then connect."""
    _selection(args, "default").validate(require_explicit=require_explicit)
    config = policy_config(args)
    cluster, default_ns = connect(args.kubeconfig, args.context)
    return cluster, _selection(args, default_ns), config


def _load(
    cluster: Cluster, selection: Selection, namespace_mode: bool = False
) -> tuple[list[Mapping[str, Any]], dict[str, dict[str, str]], list[str]]:
    """Namespaces (one list) and the Services in scope (one list cluster-wide, or one per named namespace).

    Every name is checked before anything is returned, so a typo fails before any write.
    """
    namespaces = cluster.list_namespaces()
    ns_labels = namespace_labels(namespaces)
    if namespace_mode:
        selected = select_namespaces(selection, ns_labels)
        scope: set[str] | None = None if selection.all_namespaces else set(selected)
    else:
        selected = []
        scope = selection.scope()
        if scope is not None and selection.names:
            scope &= set(ns_labels)  # a name in a missing namespace is reported with the other unknown names
        elif scope is not None:
            check_namespaces(scope, ns_labels)
    if scope is None:
        services: list[Mapping[str, Any]] = list(cluster.list_services(None))
    else:
        services = [s for ns in sorted(scope) for s in cluster.list_services(ns)]
    if not namespace_mode:
        services = select_services(selection, services, ns_labels)
    return services, ns_labels, selected


def _colour(args: argparse.Namespace, out: TextIO) -> bool:
    return render.use_colour(out, args.color)


def status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    cluster, selection, config = _connect(args, require_explicit=False)
    services, ns_labels, _ = _load(cluster, selection)
    rows = build_rows(services, ns_labels, config)
    summary = summarize(rows)
    seen, why = _traffic(cluster, getattr(args, "agent_namespace", c.DEFAULT_AGENT_NAMESPACE))
    if args.output == "table":
        out.write(render.status_table(rows, summary, _colour(args, out), seen))
        if why:
            out.write(f"(no traffic figures: {why})\n")
    else:
        out.write(render.dump(render.status_document(rows, summary, seen), args.output))
    return EXIT_OK


def _traffic(cluster: Cluster, namespace: str) -> tuple[dict[str, Traffic], str]:
    """What the node Envoys saw per Service, from the agents' Leases; ({}, why) when they cannot be read
    (status still shows everything else)."""
    try:
        leases = cluster.list_leases(namespace)
    except ClusterError as exc:
        return {}, f"cannot read the node agents' Leases in {namespace}: {exc}"
    return traffic(leases, datetime.now(UTC)), ""


def _plan(args: argparse.Namespace, direction: Direction) -> tuple[Plan, Cluster, dict[str, dict[str, str]]]:
    cluster, selection, config = _connect(args, require_explicit=True)
    services, ns_labels, selected = _load(cluster, selection, args.namespace_label)
    if args.namespace_label:
        return (
            plan_namespaces(direction, selected, services, ns_labels, config, now_stamp()),
            cluster,
            ns_labels,
        )
    return plan_services(direction, services, ns_labels, config, now_stamp()), cluster, ns_labels


def _print_plan(plan: Plan, args: argparse.Namespace, out: TextIO, dry_run: bool) -> None:
    if args.output in ("json", "yaml"):
        out.write(render.dump({**render.plan_document(plan), "dryRun": dry_run}, args.output))
        return
    out.write(render.plan_table(plan, _colour(args, out)))
    if dry_run:
        out.write("\n(dry run: nothing was changed)\n")


def plan(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    direction = Direction.ROLLBACK if args.rollback else Direction.MIGRATE
    the_plan, _, _ = _plan(args, direction)
    _print_plan(the_plan, args, out, dry_run=False)
    return EXIT_OK


def _execute(
    the_plan: Plan,
    args: argparse.Namespace,
    cluster: Cluster,
    ns_labels: dict[str, dict[str, str]],
    out: TextIO,
) -> int:
    if args.dry_run:
        _print_plan(the_plan, args, out, dry_run=True)
        return EXIT_OK
    as_text = args.output not in ("json", "yaml")

    def say(line: str) -> None:
        if as_text:
            out.write(line + "\n")
            out.flush()

    def warn(line: str) -> None:  # a JSON/YAML report stays parseable: warnings go to stderr there
        if as_text:
            say(line)
        else:
            sys.stderr.write(line + "\n")

    recorder = events.Recorder(None if getattr(args, "no_events", False) else cluster, warn,
                               action=the_plan.verb.capitalize())
    runner = Runner(
        cluster=cluster,
        config=policy_config(args),
        ns_labels=ns_labels,
        say=say,
        batch=args.batch,
        pause=args.pause,
        continue_on_error=args.continue_on_error,
        verify_timeout=args.verify_timeout,
        progress_stream=sys.stderr,
        handover=not getattr(args, "no_handover", False),
        handover_timeout=getattr(args, "handover_timeout", 30.0),
        agent_namespace=getattr(args, "agent_namespace", c.DEFAULT_AGENT_NAMESPACE),
        recorder=recorder,
    )
    report = runner.run(the_plan)
    _print_report(report, args, out)
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_report(report: Report, args: argparse.Namespace, out: TextIO) -> None:
    if args.output in ("json", "yaml"):
        out.write(render.dump(report.to_dict(), args.output))
        return
    out.write("\n" + "\n".join(summary_lines(report)) + "\n")
    if report.failures:
        sys.stderr.write("".join(f"error: {message}\n" for _, message in report.failures))


def migrate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    the_plan, cluster, ns_labels = _plan(args, Direction.MIGRATE)
    return _execute(the_plan, args, cluster, ns_labels, out)


def rollback(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    the_plan, cluster, ns_labels = _plan(args, Direction.ROLLBACK)
    return _execute(the_plan, args, cluster, ns_labels, out)


def uninstall(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from cli import uninstall as steps

    out = out or sys.stdout
    cluster, _default_ns = connect(args.kubeconfig, args.context)

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return steps.uninstall(cluster, proxy_name=args.proxy_name, agent_namespace=args.agent_namespace,
                           timeout=args.timeout, say=say)


def reconcile(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    cluster, selection, config = _connect(args, require_explicit=False)
    services, ns_labels, _ = _load(cluster, selection)
    the_plan = plan_reconcile(services, ns_labels, config, now_stamp())
    return _execute(the_plan, args, cluster, ns_labels, out)
