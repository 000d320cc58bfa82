"""The debug answers' pure parts: health rules, pages and tokens, views, text tables, settings checks."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from redirector.debug.app import wants_text
from redirector.debug.netlink import ListeningSocket
from redirector.debug.pages import MAX_LIMIT, BadRequest, decode_token, encode_token, paginate
from redirector.debug.settings import DebugSettings, check_bind, config_view, default_health_timeout
from redirector.debug.source import SyncFacts
from redirector.debug.text import render, table
from redirector.debug.views import bounded, diff_view, health_view, ready_view, rules_view, services_view
from redirector.desired import desired_state
from redirector.model import Key
from tests.redirector.factories import numbered, service

T0 = 1_800_000_000.0
FACTS = SyncFacts(started=T0, loop_alive=True, listed=True, first_sync_done=True, last_success=T0 + 100)


@pytest.mark.parametrize(("facts", "now", "status", "reason"), [
    (FACTS, T0 + 130, 200, "ok"),
    (FACTS, T0 + 161, 503, "the last successful sync is 61.0s old (threshold 60s)"),
    (replace(FACTS, loop_alive=False), T0 + 101, 503, "the sync loop is not running"),
    (replace(FACTS, first_sync_done=False, last_success=None), T0 + 30, 200, "starting: no successful sync yet"),
    (replace(FACTS, first_sync_done=False, last_success=None), T0 + 61, 503, "no successful sync in the 61.0s"),
])
def test_health_follows_kube_proxy(facts: SyncFacts, now: float, status: int, reason: str) -> None:
    code, body = health_view(facts, now, 60.0)
    assert code == status and body["reason"].startswith(reason)
    assert body["currentTime"].endswith("Z") and body["thresholdSeconds"] == 60.0
    if facts.last_success is not None:
        assert body["lastUpdated"] == "2027-01-15T08:01:40.000Z" and body["ageSeconds"] == now - facts.last_success


def test_ready_needs_the_first_sync_and_a_listener() -> None:
    listening = [ListeningSocket(6, "::", 1666)]
    assert ready_view(FACTS, 1666, listening)[0] == 200
    assert ready_view(FACTS, 1666, listening)[1]["listeners"] == [{"family": 6, "address": "::", "port": 1666}]
    code, body = ready_view(FACTS, 1666, [])
    assert code == 503 and "nothing listens on TCP port 1666" in body["reason"]
    assert ready_view(replace(FACTS, first_sync_done=False), 1666, listening)[1]["reason"].startswith("the first")
    assert "cannot check" in ready_view(FACTS, 1666, None, "netlink down")[1]["reason"]


def test_tokens_round_trip_and_refuse_anything_else() -> None:
    after = (4, False, "10.96.0.1", 80)
    assert decode_token("rules", encode_token("rules", after)) == after
    forged = [
        "", "x" * 3000, "!!!", encode_token("services", ("a", "b")),  # another endpoint's token
        base64.urlsafe_b64encode(json.dumps({"k": "rules", "a": [4, 0, "x", 80]}).encode()).decode(),  # 0 != False
        base64.urlsafe_b64encode(json.dumps({"k": "rules", "a": [4, False]}).encode()).decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(), base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ]
    for token in forged:
        with pytest.raises(BadRequest, match="invalid continue token"):
            decode_token("rules", token)


@given(st.lists(st.integers(0, 300), unique=True), st.integers(1, 50))
def test_pages_cover_everything_once_in_order(numbers: list[int], size: int) -> None:
    keys = [Key(4, f"10.96.0.{n % 256}", 80 + n // 256) for n in numbers]
    seen: list[Key] = []
    token = None
    while True:
        page = paginate(keys, Key.sort_key, kind="rules", limit=size, token=token)
        assert len(page.items) <= size and page.total == len(keys)
        seen += page.items
        token = page.next_token
        if token is None:
            break
    assert seen == sorted(keys)


def test_a_page_resumes_after_the_last_item_even_if_it_is_gone() -> None:
    keys = [Key(4, f"10.96.0.{i}", 80) for i in range(1, 6)]
    first = paginate(keys, Key.sort_key, kind="rules", limit=2, token=None)
    rest = paginate([k for k in keys if k not in first.items], Key.sort_key, kind="rules", limit=10,
                    token=first.next_token)
    assert rest.items == keys[2:]
    for bad in (0, MAX_LIMIT + 1):
        with pytest.raises(BadRequest, match="limit"):
            paginate(keys, Key.sort_key, kind="rules", limit=bad, token=None)


def test_services_group_entries_unserved_ports_and_errors() -> None:
    mixed = service("mixed", cluster_ips=["10.96.0.2"], ports=[{"name": "t", "port": 53},
                                                               {"name": "u", "port": 53, "protocol": "UDP"}])
    broken = service("broken", cluster_ips=["10.96.0.300"])
    desired = desired_state([service("web"), mixed, broken])
    body = services_view(desired, limit=None, token=None)
    by_name = {s["name"]: s for s in body["services"]}
    assert [s["name"] for s in body["services"]] == ["broken", "mixed", "web"]
    assert by_name["broken"]["entries"] == [] and "not an IP address" in by_name["broken"]["error"]
    assert by_name["mixed"]["unserved"] == [{"port_name": "u", "protocol": "UDP", "port": 53}]
    assert by_name["web"]["entries"][0]["owner"] == "shop/web:http"
    assert body["total_services"] == 3 and body["total_unserved_ports"] == 1 and body["continue"] is None
    text = render("services", body)
    assert "UNSERVED" in text and "error shop/broken" in text and "(3 of 3 Services)" in text


def test_rules_and_diff_views() -> None:
    desired = desired_state([numbered(i) for i in range(3)])
    kernel = set(desired.keys())
    missing = Key(4, "10.96.0.1", 80)
    kernel.discard(missing)
    extra = Key(6, None, 30000)
    kernel.add(extra)
    description = {"backend": "iptables", "rules": {"ipv4": [f"-A X {i}" for i in range(150)]}}
    body = rules_view(kernel, description, desired, limit=4, token=None)
    assert body["total"] == 6 and len(body["entries"]) == 4 and body["continue"]
    assert len(body["kernel"]["rules"]["ipv4"]) == 100 and body["truncated"] == {"rules.ipv4": 150}
    assert [e["owner"] for e in body["entries"]][:2] == ["scale/svc-0:http", "scale/svc-2:http"]
    diff = diff_view(desired, kernel, limit=10)
    assert not diff["in_sync"] and [e["key"] for e in diff["missing"]] == ["10.96.0.1:80"]
    assert diff["extra"] == [{"key": "*local*:30000", "family": 6, "ip": None, "port": 30000, "match": "nodePort",
                              "kind": None, "owner": None}]
    assert diff_view(desired, desired.keys(), limit=10)["in_sync"]
    assert "missing" in render("diff", diff) and "in sync" in render("diff", diff_view(desired, desired.keys(), limit=1))
    assert "-A X 99" in render("rules", body) and "-A X 100" not in render("rules", body)


def test_bounded_cuts_nested_lists() -> None:
    value, cut = bounded({"a": [{"b": list(range(5))}], "c": "x"}, limit=3)
    assert value == {"a": [{"b": [0, 1, 2]}], "c": "x"} and cut == {"a[0].b": 5}


def test_tables_are_aligned() -> None:
    text = table(["A", "LONGER"], [["wide value", None], ["x", True]])
    lines = text.splitlines()
    assert lines == ["A           LONGER", "wide value  -", "x           yes"]
    assert render("healthz", {"status": "ok", "nested": {"k": 1.5}}) == "status    ok\nnested.k  1.5\n"


@pytest.mark.parametrize(("fmt", "accept", "text"), [
    ("text", None, True), ("json", "text/plain", False), (None, None, False), (None, "*/*", False),
    (None, "text/plain", True), (None, "application/json, text/plain;q=0.5", False),
    (None, "text/plain, application/json;q=0.9", True), (None, "text/*", True), (None, "text/plain;q=x", False),
])
def test_content_negotiation(fmt: str | None, accept: str | None, text: bool) -> None:
    assert wants_text(fmt, accept) is text


@pytest.mark.parametrize(("address", "port", "message"), [
    ("localhost", 10666, "must be an IP address"), ("127.0.0.1", 10249, "collides with kube-proxy metrics"),
    ("127.0.0.1", 10256, "kube-proxy healthz"), ("::1", 15000, "Envoy admin"), ("127.0.0.1", 1666, "proxy"),
    ("127.0.0.1", 18000, "xDS"), ("127.0.0.1", 70000, "0-65535"),
])
def test_bind_collisions_are_refused(address: str, port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_bind(address, port)


def test_custom_proxy_port_is_protected_too_and_defaults_are_fine() -> None:
    with pytest.raises(ValueError, match="collides with the proxy port"):
        DebugSettings(port=2000, proxy_port=2000)
    check_bind("0.0.0.0", 10666)
    assert default_health_timeout(30) == 60 and default_health_timeout(1) == 10


def test_config_view_redacts_secrets() -> None:
    @dataclass(frozen=True)
    class Agent:
        backend: str = "nftables"
        kubeconfig: Path = Path("/etc/kubeconfig")
        api_token: str = "s3cr3t"
        password: str = ""

    from redirector.debug.settings import settings_mapping

    view = config_view(DebugSettings(agent_config=settings_mapping(Agent()), node="n1"))
    assert view["agent"] == {"backend": "nftables", "kubeconfig": "/etc/kubeconfig", "api_token": "<redacted>",
                             "password": ""}
    assert view["debug_server"]["port"] == 10666 and view["node"] == "n1"


def test_answers_stay_bounded_at_ten_thousand_services() -> None:
    desired = desired_state([numbered(i) for i in range(10_000)])  # 20,000 entries (dual-stack)
    services = services_view(desired, limit=None, token=None)
    assert len(services["services"]) == 500 and services["total_services"] == 10_000 and services["continue"]
    rules = rules_view(desired.keys(), {"backend": "nftables"}, desired, limit=5000, token=None)
    assert len(rules["entries"]) == 5000 and rules["total"] == 20_000
    pages, token = 1, rules["continue"]
    while token:
        token = rules_view(desired.keys(), {}, desired, limit=5000, token=token)["continue"]
        pages += 1
    assert pages == 4
    diff = diff_view(desired, frozenset(), limit=500)
    assert len(diff["missing"]) == 500 and diff["missing_total"] == 20_000
