"""The pure parts of the sandbox API server: selectors, patches, allocation, admission matching."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.api import admission
from sandbox.api.allocation import ServiceAllocator, carry_over
from sandbox.api.errors import ApiError
from sandbox.api.label_selectors import (
    from_label_selector_object,
    matches,
    parse_field_selector,
    parse_label_selector,
)
from sandbox.api.patching import apply_json_patch, apply_merge_patch, apply_strategic_merge_patch
from sandbox.api.resources import NAMESPACES, SERVICES
from sandbox.api.watch import ADDED, DELETED, MODIFIED, Event, translate


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "c"}, False),
        ("a!=b", {}, True),  # != matches objects without the key
        ("a notin (b,c)", {}, True),
        ("a notin (b,c)", {"a": "c"}, False),
        ("a in (b, c),d", {"a": "c", "d": ""}, True),
        ("a in (b, c),d", {"a": "c"}, False),
        ("!a", {"b": "x"}, True),
        ("example.com/x=y-1.z", {"example.com/x": "y-1.z"}, True),
        ("a=", {"a": ""}, True),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selector_semantics(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert matches(parse_label_selector(selector), labels) is expected


@pytest.mark.parametrize("bad", ["a in b", "a in (b", "=b", "a b", "a=b c", "a=(b)", "bad key=x"])
def test_malformed_label_selectors_are_400(bad: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_label_selector(bad)
    assert exc.value.code == 400


def test_field_selectors_support_only_known_fields() -> None:
    assert parse_field_selector("metadata.name=a,spec.type!=NodePort", "Service") == (
        ("metadata.name", "a", True), ("spec.type", "NodePort", False))
    with pytest.raises(ApiError, match="field label not supported"):
        parse_field_selector("spec.type=NodePort", "Namespace")


def test_label_selector_objects() -> None:
    sel = from_label_selector_object(
        {"matchLabels": {"a": "b"}, "matchExpressions": [{"key": "c", "operator": "DoesNotExist"}]}, "x")
    assert matches(sel, {"a": "b"}) and not matches(sel, {"a": "b", "c": "d"})
    assert from_label_selector_object({}, "x") == ()
    with pytest.raises(ValueError, match="values"):
        from_label_selector_object({"matchExpressions": [{"key": "c", "operator": "In"}]}, "x")


def test_json_patch_operations() -> None:
    doc = {"a": {"b": [1, 2]}, "c": "d"}
    out = apply_json_patch(doc, [
        {"op": "add", "path": "/a/b/-", "value": 3},
        {"op": "add", "path": "/a/b/0", "value": 0},
        {"op": "replace", "path": "/c", "value": "e"},
        {"op": "copy", "from": "/c", "path": "/f"},
        {"op": "move", "from": "/f", "path": "/g~1h"},
        {"op": "remove", "path": "/a/b/1"},
        {"op": "test", "path": "/g~1h", "value": "e"},
    ])
    assert out == {"a": {"b": [0, 2, 3]}, "c": "e", "g/h": "e"}
    assert doc == {"a": {"b": [1, 2]}, "c": "d"}  # input untouched
    for bad_op in ({"op": "replace", "path": "/x", "value": 1}, {"op": "remove", "path": "/a/b/5"},
                   {"op": "add", "path": "/x/y", "value": 1}, {"op": "test", "path": "/c", "value": "z"}):
        with pytest.raises(ApiError) as exc:
            apply_json_patch(doc, [bad_op])
        assert exc.value.code == 422
    with pytest.raises(ApiError) as exc:
        apply_json_patch(doc, {"op": "add"})
    assert exc.value.code == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=3), json_values, max_size=4),
       st.dictionaries(st.text(max_size=3), json_values, max_size=4))
def test_merge_patch_rfc7386_properties(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    out = apply_merge_patch(doc, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in out
        elif not isinstance(value, dict):
            assert out[key] == value
    for key in doc:
        if key not in patch:
            assert out[key] == doc[key]
    assert apply_merge_patch(out, patch) == out  # idempotent


def test_strategic_merge_merges_ports_by_port_and_deletes() -> None:
    svc = {"spec": {"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "b"}], "selector": {"x": "1"}}}
    out = apply_strategic_merge_patch(svc, {"spec": {
        "ports": [{"port": 80, "name": "http"}, {"port": 81, "$patch": "delete"}, {"port": 90}],
        "selector": {"y": "2"}}})
    assert out["spec"]["ports"] == [{"port": 80, "name": "http"}, {"port": 90}]
    assert out["spec"]["selector"] == {"x": "1", "y": "2"}


def _svc(**spec: Any) -> dict[str, Any]:
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("ports", [{"port": 80, "protocol": "TCP"}])
    return {"metadata": {"name": "s"}, "spec": spec}


def test_allocator_reuses_released_addresses_and_refuses_collisions() -> None:
    alloc = ServiceAllocator("10.96.0.0/29", None, (30000, 30001))
    got = []
    for _ in range(6):  # a /29 has 6 usable host addresses
        svc = alloc.allocate(_svc())
        alloc.commit(svc, None)
        got.append(svc)
    assert len({s["spec"]["clusterIP"] for s in got}) == 6
    with pytest.raises(ApiError, match="range is full"):
        alloc.allocate(_svc())
    alloc.commit(None, got[0])
    assert alloc.allocate(_svc())["spec"]["clusterIP"] == got[0]["spec"]["clusterIP"]
    np = alloc.allocate(_svc(type="NodePort", ports=[{"port": 1, "protocol": "TCP"}, {"port": 2, "protocol": "TCP"}]))
    assert sorted(p["nodePort"] for p in np["spec"]["ports"]) == [30000, 30001]


def test_carry_over_keeps_allocations_and_drops_type_dependent_fields() -> None:
    old = _svc(type="NodePort", clusterIP="10.96.0.5", clusterIPs=["10.96.0.5"], ipFamilies=["IPv4"],
               ports=[{"port": 80, "protocol": "TCP", "nodePort": 30005}])
    kept = carry_over(_svc(type="NodePort"), old)
    assert kept["spec"]["clusterIPs"] == ["10.96.0.5"] and kept["spec"]["ports"][0]["nodePort"] == 30005
    to_cip = carry_over(_svc(ports=[{"port": 80, "protocol": "TCP", "nodePort": 30005}]), old)
    assert "nodePort" not in to_cip["spec"]["ports"][0]
    with pytest.raises(ApiError, match="may not change"):
        carry_over(_svc(clusterIP="10.96.0.6"), old)


def test_watch_translation_of_selector_transitions() -> None:
    def accept(o: Any) -> bool:
        return bool(o["metadata"].get("labels", {}).get("on"))

    on = {"metadata": {"name": "a", "namespace": "n", "labels": {"on": "1"}}}
    off = {"metadata": {"name": "a", "namespace": "n", "labels": {}}}
    # Stops matching: DELETED with the previous (matching) object at the event's resourceVersion.
    on_at_2 = {"metadata": {**on["metadata"], "resourceVersion": "2"}}
    assert translate(Event(2, SERVICES, MODIFIED, off, on), None, accept) == (DELETED, on_at_2)
    assert "resourceVersion" not in on["metadata"]  # the stored object is not mutated
    assert translate(Event(3, SERVICES, MODIFIED, on, off), None, accept) == (ADDED, on)
    assert translate(Event(4, SERVICES, MODIFIED, on, on), "n", accept) == (MODIFIED, on)
    assert translate(Event(5, SERVICES, MODIFIED, off, off), None, accept) is None
    assert translate(Event(6, SERVICES, ADDED, on), "other", accept) is None


def test_admission_rule_matching() -> None:
    rule = {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["services"]}
    req = admission.Request(SERVICES, "CREATE", "n", "s", {"metadata": {}}, None)
    assert admission.rule_matches(rule, req)
    assert not admission.rule_matches({**rule, "operations": ["UPDATE"]}, req)
    assert not admission.rule_matches({**rule, "scope": "Cluster"}, req)
    status = admission.Request(SERVICES, "CREATE", "n", "s", {"metadata": {}}, None, "status")
    assert not admission.rule_matches(rule, status)
    assert admission.rule_matches({**rule, "resources": ["services/*"]}, status)
    assert admission.rule_matches({**rule, "resources": ["*/*"]}, status)
    ns_req = admission.Request(NAMESPACES, "CREATE", None, "x", {"metadata": {"labels": {"a": "b"}}}, None)
    hook = {"rules": [{**rule, "resources": ["*"]}], "namespaceSelector": {"matchLabels": {"a": "b"}}}
    assert admission.webhook_applies(hook, ns_req, None)  # a Namespace is matched by its own labels
