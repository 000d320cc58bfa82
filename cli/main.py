"""`lightpath` / `kubectl lightpath`: see where every Service stands and move it between kube-proxy and lightpath.

WHY global flags are accepted before AND after the command: kubectl users type
`kubectl lightpath status -A --context prod` as readily as `--context prod status -A`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cli import commands
from cli.help_text import (
    MAIN_EPILOG,
    MIGRATE_EPILOG,
    PLAN_EPILOG,
    RECONCILE_EPILOG,
    ROLLBACK_EPILOG,
    STATUS_EPILOG,
    UNINSTALL_EPILOG,
)
from cli.kube import ClusterError
from cli.selection import SelectionError
from shared import constants as c

Formatter = argparse.RawDescriptionHelpFormatter

SELECT_HELP = "Service name, or namespace/name (a bare name is looked up in -n or the context's namespace)"


def _global_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """kubectl-like connection flags and the policy config (which must match the webhook's).

    The copy on each subcommand uses SUPPRESS defaults so it never overwrites a value given before it.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    excluded = ",".join(c.DEFAULT_EXCLUDED_NAMESPACES)
    g = parser.add_argument_group("global flags")
    g.add_argument(
        "--kubeconfig",
        default=default(None),
        help="path to the kubeconfig (default: $KUBECONFIG or ~/.kube/config)",
    )
    g.add_argument(
        "--context", default=default(None), help="kubeconfig context to use (default: the current context)"
    )
    g.add_argument(
        "--proxy-name",
        default=default(c.DEFAULT_PROXY_NAME),
        help=f"our {c.SERVICE_PROXY_NAME_LABEL} value (default: {c.DEFAULT_PROXY_NAME})",
    )
    g.add_argument(
        "--mode",
        choices=c.MODES,
        default=default(c.DEFAULT_MODE),
        help=f"global policy mode, as the webhook runs it (default: {c.DEFAULT_MODE})",
    )
    g.add_argument(
        "--excluded-namespaces",
        default=default(excluded),
        metavar="NS,NS",
        help=f"namespaces the policy never touches (default: {excluded})",
    )
    g.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=default("auto"),
        help="colour output: auto = only on a terminal (default: auto)",
    )


def _selector(p: argparse.ArgumentParser, names: bool, names_help: str = SELECT_HELP) -> None:
    if names:
        p.add_argument("names", nargs="*", metavar="SERVICE", help=names_help)
    p.add_argument("-n", "--namespace", help="the namespace (default: the context's namespace)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (one paginated list)")


def _batching(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=10,
        metavar="N",
        help="Services written per batch before reading them back (default: 10)",
    )
    p.add_argument(
        "--pause", type=float, default=0.0, metavar="SECONDS", help="wait between batches (default: 0)"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    p.add_argument(
        "--continue-on-error",
        action="store_true",
        help="keep going after a Service fails verification (exit code is still 1)",
    )
    p.add_argument(
        "--verify-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a namespace-mode Service may take to move (default: 10)",
    )
    p.add_argument("--handover-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="migrate: how long every live node agent has to prepare a Service before its label "
                        "(make-before-break; default: 30)")
    p.add_argument("--no-handover", action="store_true",
                   help="migrate: set the label at once, without waiting for the node agents")
    p.add_argument("--agent-namespace", default=c.DEFAULT_AGENT_NAMESPACE, metavar="NAMESPACE",
                   help=f"where the node agents' Leases are (default: {c.DEFAULT_AGENT_NAMESPACE})")
    p.add_argument("--no-events", action="store_true",
                   help="write no Kubernetes Events on the Services (HandoverStarted, Migrated, ...)")
    _output(p, "text", "report")


def _output(p: argparse.ArgumentParser, human: str, noun: str) -> None:
    """``-o``: the ``human`` format by default, or json/yaml for scripts."""
    p.add_argument(
        "-o",
        "--output",
        choices=(human, "json", "yaml"),
        default=human,
        help=f"{noun} format (default: {human})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightpath",
        description="Move Kubernetes Services between kube-proxy and the lightpath proxy, one at a time, and see where each stands.",
        epilog=MAIN_EPILOG,
        formatter_class=Formatter,
    )
    _global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parent = argparse.ArgumentParser(add_help=False)
    _global_flags(parent, suppress=True)

    def command(
        name: str, help_text: str, epilog: str, handler: Callable[..., int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog,
            formatter_class=Formatter,
            parents=[parent],
        )
        p.set_defaults(handler=handler)
        return p

    p = command(
        "status",
        "One row per Service: who handles it, what the policy wants and why, PENDING mismatches.",
        STATUS_EPILOG,
        commands.status,
    )
    _selector(p, names=False)
    p.add_argument("--agent-namespace", default=c.DEFAULT_AGENT_NAMESPACE, metavar="NAMESPACE",
                   help="where the node agents' Leases (with the traffic each node's Envoy saw) are "
                        f"(default: {c.DEFAULT_AGENT_NAMESPACE})")
    _output(p, "table", "output")

    p = command(
        "plan",
        "What migrate (or rollback) would change and what it would skip, with reasons. Changes nothing.",
        PLAN_EPILOG,
        commands.plan,
    )
    _selector(p, names=True)
    p.add_argument(
        "--namespace-label",
        action="store_true",
        help="plan labelling Namespaces (positional names are namespaces)",
    )
    p.add_argument("--rollback", action="store_true", help="plan a rollback instead of a migration")
    _output(p, "table", "output")

    for name, handler, text, epilog in (
        (
            "migrate",
            commands.migrate,
            f"Opt Services (or Namespaces) in with {c.OPT_LABEL}={c.OPT_ENABLED}; verify the webhook handed them to lightpath.",
            MIGRATE_EPILOG,
        ),
        (
            "rollback",
            commands.rollback,
            f"Set {c.OPT_LABEL}={c.OPT_DISABLED}; verify the handoff label is gone (back on kube-proxy).",
            ROLLBACK_EPILOG,
        ),
    ):
        p = command(name, text, epilog, handler)
        _selector(p, names=True)
        p.add_argument(
            "--namespace-label",
            action="store_true",
            help="label the Namespaces instead of each Service (positional names are namespaces)",
        )
        _batching(p)

    p = command(
        "reconcile",
        "Bring every PENDING Service to what the policy says (catch-up after webhook downtime).",
        RECONCILE_EPILOG,
        commands.reconcile,
    )
    _selector(p, names=False)
    _batching(p)

    p = command(
        "uninstall",
        "Hand every Service back to kube-proxy on every node, so the components can be deleted safely.",
        UNINSTALL_EPILOG,
        commands.uninstall,
    )
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long the node agents have to release their redirects (default: 120)")
    p.add_argument("--agent-namespace", default=c.DEFAULT_AGENT_NAMESPACE, metavar="NAMESPACE",
                   help=f"where the node agents' Leases are (default: {c.DEFAULT_AGENT_NAMESPACE})")

    _add_certs(sub)
    return parser


def _add_certs(sub: Any) -> None:
    """`certs generate` lives in cli/certs.py (owned by deploy); register it when that module is present."""
    try:
        certs = importlib.import_module("cli.certs")
    except ImportError:
        return
    add = getattr(certs, "add_certs_parser", None)
    if callable(add):
        add(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        func = getattr(args, "func", None)  # subcommands registered by other modules (certs)
        if callable(func):
            return int(func(args) or 0)
        parser.print_help()
        return commands.EXIT_USAGE
    try:
        return int(handler(args))
    except SelectionError as exc:
        print(f"error: {exc}; nothing was changed", file=sys.stderr)
        return commands.EXIT_USAGE
    except ValueError as exc:  # a bad policy flag (PolicyConfig validates)
        print(f"error: {exc}", file=sys.stderr)
        return commands.EXIT_USAGE
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return commands.EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return commands.EXIT_INTERRUPTED
    except BrokenPipeError:  # `lightpath status -A | head`: stop quietly, no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return commands.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
