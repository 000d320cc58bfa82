"""Rendering: aligned table with colour only when asked, machine-checkable JSON/YAML, progress bar text."""

from __future__ import annotations

import io
import json

import jsonschema
import pytest
import yaml

from cli import render
from cli.plan import Direction, plan_services
from cli.progress import Progress, bar
from cli.rows import build_rows, namespace_labels, summarize
from shared.policy import PolicyConfig
from tests.cli.cluster import ENABLED, mixed_cluster, service
from tests.cli.schema import STATUS_SCHEMA

CFG = PolicyConfig()


def _status(colour: bool, extra: list | None = None) -> str:
    namespaces, services = mixed_cluster()
    rows = build_rows(services + (extra or []), namespace_labels(namespaces), CFG)
    return render.status_table(rows, summarize(rows), colour)


def test_plain_table_is_aligned_and_has_no_escape_codes() -> None:
    text = _status(colour=False)
    assert "\033[" not in text
    lines = text.splitlines()
    header = lines[0]
    assert header.split() == list(render.STATUS_HEADERS)
    starts = []
    for h in render.STATUS_HEADERS:
        starts.append(header.index(h, starts[-1] + 1 if starts else 0))
    for line in lines[1:8]:  # every column of every row starts under its header
        for start in starts[1:]:
            assert line[start - 1] == " " and line[start] != " "
    assert "other proxy cilium" in text and "53/TCP,53/UDP" in text
    assert lines[-1].startswith("7 Services: 0 on lightpath")


def test_colour_table_marks_pending_and_keeps_alignment() -> None:
    plain = _status(colour=False, extra=[service("late", "shop", labels=ENABLED)])
    coloured = _status(colour=True, extra=[service("late", "shop", labels=ENABLED)])
    assert "\033[1;31mPENDING\033[0m" in coloured
    stripped = coloured
    for code in {*render.STYLES.values(), render.RESET}:
        stripped = stripped.replace(code, "")
    assert stripped == plain


def test_use_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert render.use_colour(Tty()) and not render.use_colour(io.StringIO())
    assert render.use_colour(io.StringIO(), "always") and not render.use_colour(Tty(), "never")
    monkeypatch.setenv("NO_COLOR", "1")
    assert not render.use_colour(Tty())


def test_status_document_round_trips_as_json_and_yaml() -> None:
    namespaces, services = mixed_cluster()
    rows = build_rows(services, namespace_labels(namespaces), CFG)
    doc = render.status_document(rows, summarize(rows))
    from_json = json.loads(render.dump(doc, "json"))
    from_yaml = yaml.safe_load(render.dump(doc, "yaml"))
    assert from_json == from_yaml == doc
    assert from_json["kind"] == "ServiceStatusList" and from_json["summary"]["total"] == 7
    assert {i["name"] for i in from_json["items"]} == {s["metadata"]["name"] for s in services}


def test_plan_table_and_document() -> None:
    namespaces, services = mixed_cluster()
    plan = plan_services(Direction.MIGRATE, services, namespace_labels(namespaces), CFG, "now")
    text = render.plan_table(plan, colour=False)
    assert text.startswith(
        "Plan for migrate: 2 Service(s) to change (2 label, 0 touch), 0 unchanged, 5 skipped"
    )
    assert any(line.split()[:3] == ["label", "shop/web", "lightpath"] for line in text.splitlines())
    doc = json.loads(render.dump(render.plan_document(plan), "json"))
    assert {(s["name"], s["action"]) for s in doc["services"]} >= {("web", "label"), ("dns", "skip")}


def test_progress_bar() -> None:
    assert bar(3, 10, "migrate", width=10) == "migrate [###.......]  3/10"
    assert bar(0, 0, "x", width=4) == "x [....] 0/0"
    quiet = io.StringIO()
    p = Progress(quiet, 5, "migrate")  # not a terminal: draws nothing
    p.advance(2)
    p.clear()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    p = Progress(loud, 4, "migrate", enabled=True)
    p.advance(4)
    assert loud.getvalue().endswith("[" + "#" * 30 + "] 4/4")


def test_status_json_matches_its_schema() -> None:
    namespaces, services = mixed_cluster()
    services.append(service("late", "shop", labels=ENABLED))
    rows = build_rows(services, namespace_labels(namespaces), CFG)
    doc = json.loads(render.dump(render.status_document(rows, summarize(rows)), "json"))
    jsonschema.validate(doc, STATUS_SCHEMA)
    assert doc["summary"]["total"] == len(doc["items"]) == 8
    assert sum(i["pending"] for i in doc["items"]) == doc["summary"]["pending"] == 1


def test_traffic_column_only_when_a_shown_service_has_traffic() -> None:
    from shared.agents import Traffic

    namespaces, services = mixed_cluster()
    rows = build_rows(services, namespace_labels(namespaces), CFG)
    first = str(rows[0].ref)
    seen = {first: Traffic(12.5, 0.25, 1.0, 8.4, 2, 5.0)}
    text = render.status_table(rows, summarize(rows), False, seen)
    header, line = text.splitlines()[0], text.splitlines()[1]
    assert header.split()[-2:] == ["TRAFFIC", "REASON"]
    assert "12.5 req/s, 2.0% 5xx, 1 retries/s, p99 8.4 ms" in line
    assert text.splitlines()[2][header.index("TRAFFIC"):].startswith("- ")  # a Service without traffic
    assert "TRAFFIC" not in render.status_table(rows, summarize(rows), False, {"elsewhere/x": seen[first]})
    document = render.status_document(rows, summarize(rows), seen)
    jsonschema.validate(document, STATUS_SCHEMA)
    assert document["items"][0]["traffic"]["requestsPerSecond"] == 12.5 and document["items"][1]["traffic"] is None
