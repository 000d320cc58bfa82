"""Text, JSON and YAML rendering (pure: strings in, strings out).

WHY colour is a parameter, not a global: the caller decides once from the terminal (``isatty``,
``NO_COLOR``, ``--color``) and tests can render both forms without faking a terminal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import yaml

from cli.plan import Item, Plan, Step
from cli.rows import KUBE_PROXY, LIGHTPATH, OTHER_PREFIX, Row, Summary, display_handler, ports_text
from shared.agents import Traffic

RESET = "\033[0m"
STYLES = {
    "bold": "\033[1m",
    "dim": "\033[2m",
    "red": "\033[31m",
    "green": "\033[32m",
    "yellow": "\033[33m",
    "cyan": "\033[36m",
    "pending": "\033[1;31m",
}

Cell = tuple[str, str | None]  # (text, style name or None)


def use_colour(stream: TextIO, choice: str = "auto") -> bool:
    """Colour only on a terminal (and never when NO_COLOR is set), unless forced with --color."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, style: str | None, colour: bool) -> str:
    if not colour or not style or not text:
        return text
    return f"{STYLES[style]}{text}{RESET}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], colour: bool) -> str:
    """Columns aligned on the visible width (escape codes are added after padding); last column unpadded."""
    body = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        for i, (text, _) in enumerate(r):
            widths[i] = max(widths[i], len(text))
    lines = [_line([(h, "bold") for h in headers], widths, colour)]
    lines.extend(_line(r, widths, colour) for r in body)
    return "\n".join(lines) + "\n"


def _line(cells: Sequence[Cell], widths: Sequence[int], colour: bool) -> str:
    out = []
    last = len(cells) - 1
    for i, (text, style) in enumerate(cells):
        pad = "" if i == last else " " * (widths[i] - len(text) + 3)
        out.append(paint(text, style, colour) + pad)
    return "".join(out).rstrip()


def handler_style(handled_by: str) -> str | None:
    if handled_by == LIGHTPATH:
        return "green"
    if handled_by.startswith(OTHER_PREFIX):
        return "yellow"
    if handled_by == KUBE_PROXY:
        return None
    return "cyan"


STATUS_HEADERS = ("NAMESPACE", "NAME", "TYPE", "PORTS", "HANDLED-BY", "WANTS", "PENDING", "REASON")


def traffic_text(t: Traffic | None) -> str:
    if t is None:
        return "-"
    parts = [f"{t.requests:g} req/s", f"{100 * t.error_ratio:.1f}% 5xx"]
    if t.retries:
        parts.append(f"{t.retries:g} retries/s")
    if t.p99_ms is not None:
        parts.append(f"p99 {t.p99_ms:g} ms")
    return ", ".join(parts)


def status_table(rows: Sequence[Row], summary: Summary, colour: bool,
                 traffic: Mapping[str, Traffic] | None = None) -> str:
    """The `status` table plus its summary line; a TRAFFIC column (what the node Envoys saw, from the agents'
    Leases) when any shown Service has traffic."""
    traffic = traffic or {}
    shown = any(str(r.ref) in traffic for r in rows)
    cells = [
        [
            (r.ref.namespace, None),
            (r.ref.name, None),
            (r.type, None),
            (ports_text(r.ports), None),
            (display_handler(r.handled_by), handler_style(r.handled_by)),
            (display_handler(r.wants), handler_style(r.wants)),
            # a handover mark is the more specific state: a migration under way (or stuck half-way)
            ("HANDOVER" if r.handover else ("PENDING" if r.pending else "-"),
             "pending" if r.pending or r.handover else "dim"),
            *([(traffic_text(traffic.get(str(r.ref))), None)] if shown else []),
            (r.reason, None),
        ]
        for r in rows
    ]
    headers = (*STATUS_HEADERS[:-1], "TRAFFIC", STATUS_HEADERS[-1]) if shown else STATUS_HEADERS
    text = table(headers, cells, colour) if rows else "No Services found.\n"
    line = summary.text()
    if summary.pending:
        line = line.replace(
            f"{summary.pending} PENDING", paint(f"{summary.pending} PENDING", "pending", colour)
        )
    return text + "\n" + line + "\n"


def status_document(rows: Sequence[Row], summary: Summary,
                    traffic: Mapping[str, Traffic] | None = None) -> dict[str, Any]:
    """The machine-checkable document for ``-o json|yaml`` (``traffic``: per item, null when none seen)."""
    traffic = traffic or {}
    items = []
    for r in rows:
        item = r.to_dict()
        seen = traffic.get(str(r.ref))
        item["traffic"] = seen.to_dict() if seen is not None else None
        items.append(item)
    return {
        "apiVersion": "lightpath.cloud/v1",
        "kind": "ServiceStatusList",
        "items": items,
        "summary": summary.to_dict(),
    }


def dump(document: Any, fmt: str) -> str:
    """JSON (indented, sorted-free to keep field order) or YAML."""
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "yaml":
        return str(yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    raise ValueError(f"unknown output format {fmt!r}")


def _step_style(step: Step) -> str | None:
    return {Step.LABEL: "green", Step.TOUCH: "cyan", Step.SKIP: "yellow", Step.UNCHANGED: "dim"}.get(step)


def plan_headline(plan: Plan) -> str:
    label, touch = plan.count(Step.LABEL), plan.count(Step.TOUCH)
    ns = sum(i.step is Step.LABEL for i in plan.namespaces)
    ns_text = f"{ns} Namespace label(s), " if plan.namespaces else ""
    return (
        f"Plan for {plan.verb}: {ns_text}{label + touch} Service(s) to change ({label} label, {touch} touch), "
        f"{plan.count(Step.UNCHANGED)} unchanged, {plan.count(Step.SKIP)} skipped"
    )


def plan_table(plan: Plan, colour: bool) -> str:
    """Namespaces first (namespace mode), then one row per Service: action, who serves it after, why."""
    parts = [plan_headline(plan) + "\n"]
    if plan.namespaces:
        parts.append(
            "\n"
            + table(
                ("ACTION", "NAMESPACE", "REASON"),
                [
                    [(str(i.step), _step_style(i.step)), (i.ref.name, None), (i.reason, None)]
                    for i in plan.namespaces
                ],
                colour,
            )
        )
    if plan.services:
        rows = [
            [
                (str(i.step), _step_style(i.step)),
                (str(i.ref), None),
                (display_handler(i.expect), handler_style(i.expect)),
                (i.reason, None),
            ]
            for i in plan.services
        ]
        parts.append("\n" + table(("ACTION", "SERVICE", "AFTER", "REASON"), rows, colour))
    return "".join(parts)


def plan_document(plan: Plan) -> dict[str, Any]:
    def item(i: Item) -> dict[str, Any]:
        return {
            "namespace": i.ref.namespace,
            "name": i.ref.name,
            "action": str(i.step),
            "after": i.expect,
            "reason": i.reason,
            "patch": i.patch,
        }

    return {
        "apiVersion": "lightpath.cloud/v1",
        "kind": "Plan",
        "verb": plan.verb,
        "namespaces": [
            {"name": i.ref.name, "action": str(i.step), "reason": i.reason, "patch": i.patch}
            for i in plan.namespaces
        ],
        "services": [item(i) for i in plan.services],
    }
