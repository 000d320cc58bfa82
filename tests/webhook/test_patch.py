"""The JSONPatch built from a decision: escaping, creating maps, removing, the reason annotation."""

from __future__ import annotations

from typing import Any

import jsonpatch
import pytest

from shared import constants as c
from shared.policy import PolicyConfig, decide
from webhook.patch import ANNOTATIONS_LIMIT, LABEL_PATH, REASON_PATH, escape, plan

CONFIG = PolicyConfig()
OPTED_IN = {c.OPT_LABEL: c.OPT_ENABLED}


def service(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
            ports: list[dict[str, Any]] | None = None, namespace: str = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"ports": ports if ports is not None else [{"name": "http", "port": 80}]}}


def run(svc: dict[str, Any], ns_labels: dict[str, str], config: PolicyConfig = CONFIG) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    p = plan(svc, decide(svc, ns_labels, config), ns_labels, config)
    return list(p.ops), jsonpatch.apply_patch(svc, list(p.ops))


def test_escape_follows_rfc6901() -> None:
    assert escape("service.kubernetes.io/service-proxy-name") == "service.kubernetes.io~1service-proxy-name"
    assert escape("a~b/c") == "a~0b~1c"
    assert LABEL_PATH == "/metadata/labels/service.kubernetes.io~1service-proxy-name"
    assert REASON_PATH == "/metadata/annotations/lightpath.cloud~1reason"


def test_label_creates_missing_labels_and_annotations_maps() -> None:
    ops, patched = run(service(), OPTED_IN)
    assert [(o["op"], o["path"]) for o in ops] == [("add", "/metadata/labels"), ("add", "/metadata/annotations")]
    assert patched["metadata"]["labels"] == {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
    assert patched["metadata"]["annotations"][c.REASON_ANNOTATION].startswith("namespace opted in")


def test_label_adds_into_existing_maps_and_keeps_other_keys() -> None:
    ops, patched = run(service(labels={"app": "web"}, annotations={"team": "a"}), OPTED_IN)
    assert [(o["op"], o["path"]) for o in ops] == [("add", LABEL_PATH), ("add", REASON_PATH)]
    assert patched["metadata"]["labels"] == {"app": "web", c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}
    assert patched["metadata"]["annotations"]["team"] == "a"


def test_null_labels_are_replaced_by_a_map() -> None:
    svc = service()
    svc["metadata"]["labels"] = None
    ops, patched = run(svc, OPTED_IN)
    assert ops[0] == {"op": "add", "path": "/metadata/labels", "value": {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}}
    assert patched["metadata"]["labels"] == {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


def test_handing_back_removes_only_our_label_and_updates_the_reason() -> None:
    svc = service(labels={"app": "web", c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME},
                  annotations={c.REASON_ANNOTATION: "old"},
                  ports=[{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    ops, patched = run(svc, OPTED_IN)
    assert [(o["op"], o["path"]) for o in ops] == [("remove", LABEL_PATH), ("replace", REASON_PATH)]
    assert patched["metadata"]["labels"] == {"app": "web"}
    # The annotation holds the steady reason (what the next admission will say), not "back to ...".
    assert patched["metadata"]["annotations"][c.REASON_ANNOTATION].startswith("port dns/UDP 53 stays with kube-proxy")


def test_already_right_gets_no_patch() -> None:
    svc = service(labels={c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME})
    _, once = run(svc, OPTED_IN)
    ops, _ = run(once, OPTED_IN)
    assert ops == []


def test_reason_annotation_patched_only_when_it_changes() -> None:
    svc = service(labels={c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME},
                  annotations={c.REASON_ANNOTATION: "stale reason"})
    ops, patched = run(svc, OPTED_IN)
    assert [(o["op"], o["path"]) for o in ops] == [("replace", REASON_PATH)]
    assert run(patched, OPTED_IN)[0] == []


@pytest.mark.parametrize(
    ("svc", "ns_labels", "why"),
    [
        (service(labels={c.SERVICE_PROXY_NAME_LABEL: "other-proxy"}), OPTED_IN, "another proxy owns it"),
        (service(namespace="kube-system"), OPTED_IN, "excluded namespace"),
        (service(), {}, "nobody opted in (global opt-in mode)"),
        (service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]), {}, "UDP, not opted in"),
    ],
)
def test_untouched(svc: dict[str, Any], ns_labels: dict[str, str], why: str) -> None:
    p = plan(svc, decide(svc, ns_labels, CONFIG), ns_labels, CONFIG)
    assert p.ops == () and p.warning is None, why


def test_opted_in_but_ineligible_is_explained_not_labelled() -> None:
    svc = service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    p = plan(svc, decide(svc, OPTED_IN, CONFIG), OPTED_IN, CONFIG)
    assert [(o["op"], o["path"]) for o in p.ops] == [("add", "/metadata/annotations")]
    assert p.warning == "lightpath: Service web keeps kube-proxy: port dns/UDP 53 stays with kube-proxy (the label would move every port)"


def test_opt_out_mode_labels_without_any_opt_label() -> None:
    config = PolicyConfig(mode=c.MODE_OPT_OUT)
    _, patched = run(service(), {}, config)
    assert patched["metadata"]["labels"][c.SERVICE_PROXY_NAME_LABEL] == c.DEFAULT_PROXY_NAME


def test_custom_proxy_name_is_the_label_value() -> None:
    config = PolicyConfig(proxy_name="edge")
    _, patched = run(service(), OPTED_IN, config)
    assert patched["metadata"]["labels"][c.SERVICE_PROXY_NAME_LABEL] == "edge"


def test_malformed_metadata_maps_get_no_patch() -> None:
    svc = service()
    svc["metadata"]["labels"] = ["not", "a", "map"]
    assert plan(svc, decide(svc, OPTED_IN, CONFIG), OPTED_IN, CONFIG).ops == ()


def test_warning_is_printable_and_bounded() -> None:
    svc = service(ports=[{"name": "d\nns" + "x" * 400, "port": 53, "protocol": "UDP"}])
    warning = plan(svc, decide(svc, OPTED_IN, CONFIG), OPTED_IN, CONFIG).warning
    assert warning is not None and len(warning) <= 256 and "\n" not in warning


def test_the_reason_is_left_out_when_it_would_push_annotations_over_the_limit() -> None:
    """kube-apiserver refuses a Service whose annotations exceed 256 KiB in total; the webhook never adds
    the annotation that would tip it over (issue 17 item 1), but still moves the label."""
    room = ANNOTATIONS_LIMIT - len("big") - 30  # less than the key and the reason need
    ops, patched = run(service(annotations={"big": "x" * room}), OPTED_IN)
    assert [o["path"] for o in ops] == ["/metadata/labels"]
    assert c.REASON_ANNOTATION not in patched["metadata"]["annotations"]
    assert patched["metadata"]["labels"][c.SERVICE_PROXY_NAME_LABEL] == c.DEFAULT_PROXY_NAME
    ops, patched = run(service(annotations={"big": "x" * (room - 300)}), OPTED_IN)
    assert c.REASON_ANNOTATION in patched["metadata"]["annotations"]


def test_no_handover_mark_when_it_would_push_annotations_over_the_limit() -> None:
    """The handover mark (UPDATE) is bounded like the reason: a Service whose annotations leave no room for
    it gets no write at all and a warning saying so, instead of a patch kube-apiserver would refuse."""
    room = ANNOTATIONS_LIMIT - len("big") - len(c.HANDOVER_ANNOTATION) - len(c.HANDOVER_MIGRATE) + 1
    full = service(annotations={"big": "x" * room})
    p = plan(full, decide(full, OPTED_IN, CONFIG), OPTED_IN, CONFIG, on_label="mark")
    assert p.ops == () and p.warning is not None and "no room for the handover mark" in p.warning
    roomy = service(annotations={"big": "x" * (room - 1)})
    p = plan(roomy, decide(roomy, OPTED_IN, CONFIG), OPTED_IN, CONFIG, on_label="mark")
    assert {"op": "add", "path": "/metadata/annotations/" + escape(c.HANDOVER_ANNOTATION),
            "value": c.HANDOVER_MIGRATE} in p.ops
    # Room for the mark but not for the mark AND the reason: the mark only (both would be refused).
    assert all(o["path"] != REASON_PATH for o in p.ops)
    assert sum(len(k) + len(v) for k, v in jsonpatch.apply_patch(roomy, list(p.ops))["metadata"]["annotations"].items()) <= ANNOTATIONS_LIMIT
