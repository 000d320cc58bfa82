"""The webhook's part in the make-before-break migration (docs/migration.md, "Handover protocol"): a Service
that becomes wanted on UPDATE is marked, not labelled; its driver (the CLI, the handover controller) sets the
label once every live node agent prepared it. Pure: the admission function on crafted requests."""

from __future__ import annotations

from typing import Any

import jsonpatch

from shared import constants as c
from shared.policy import PolicyConfig
from webhook.review import admit, handover_step, parse_review

CONFIG = PolicyConfig()
OPTED = {c.OPT_LABEL: c.OPT_ENABLED}


def svc(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
        protocol: str = "TCP") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "shop", "labels": labels or {}}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "protocol": protocol}]}}


def answer(obj: dict[str, Any], operation: str, old: dict[str, Any] | None = None, *, handover: bool = True,
           ) -> tuple[dict[str, Any], list[str]]:
    request = {"uid": "u1", "operation": operation, "namespace": "shop", "name": "web",
               "kind": {"group": "", "version": "v1", "kind": "Service"}, "object": obj, "oldObject": old}
    doc = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    result = admit(parse_review(doc), {}, CONFIG, handover=handover)
    return jsonpatch.apply_patch(obj, list(result.ops)), list(result.warnings)


def label(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("labels") or {}).get(c.SERVICE_PROXY_NAME_LABEL)


def mark(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(c.HANDOVER_ANNOTATION)


def test_create_is_labelled_at_once_and_update_is_marked() -> None:
    created, _ = answer(svc(OPTED), "CREATE")
    assert label(created) == c.DEFAULT_PROXY_NAME and mark(created) is None  # nothing to hand over yet
    updated, warnings = answer(svc(OPTED), "UPDATE", svc())
    assert label(updated) is None and mark(updated) == c.HANDOVER_MIGRATE
    assert any("handover started" in w for w in warnings)
    again, _ = answer(updated, "UPDATE", updated)  # while marked: nothing, the driver labels it
    assert again == updated
    assert mark(answer(svc(OPTED, {}), "UPDATE", svc())[0]) == c.HANDOVER_MIGRATE  # an empty annotation map


def test_the_drivers_final_write_is_kept_and_an_abort_is_not_undone() -> None:
    marked = svc(OPTED, {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE})
    done = svc({**OPTED, c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}, {})
    final, _ = answer(done, "UPDATE", marked)
    assert label(final) == c.DEFAULT_PROXY_NAME and mark(final) is None
    aborted, _ = answer(svc(OPTED, {}), "UPDATE", marked)  # the mark went without the label: the driver gave up
    assert label(aborted) is None and mark(aborted) is None
    retried, _ = answer(svc(OPTED, {}), "UPDATE", svc(OPTED, {}))  # the Service's next change starts again
    assert mark(retried) == c.HANDOVER_MIGRATE


def test_handover_off_labels_on_update_at_once() -> None:
    updated, _ = answer(svc(OPTED), "UPDATE", svc(), handover=False)
    assert label(updated) == c.DEFAULT_PROXY_NAME and mark(updated) is None


def test_a_mark_agents_will_ignore_gets_a_warning() -> None:
    _, garbage = answer(svc({}, {c.HANDOVER_ANNOTATION: "yes please"}), "UPDATE", svc())
    assert any("lightpath.cloud/handover ignored: value" in w for w in garbage), garbage
    _, udp = answer(svc(OPTED, {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE}, protocol="UDP"), "UPDATE", svc())
    assert any("ignored: the Service is not eligible" in w for w in udp), udp
    other = svc({c.SERVICE_PROXY_NAME_LABEL: "someone-else"}, {c.HANDOVER_ANNOTATION: c.HANDOVER_MIGRATE})
    _, theirs = answer(other, "UPDATE", other)
    assert any("ignored" in w and "another proxy" in w for w in theirs), theirs


def test_handover_step_is_total() -> None:
    assert handover_step("DELETE", svc(), None) == "label"
    assert handover_step("UPDATE", svc(), "not a service") == "mark"
    assert handover_step("UPDATE", {"metadata": {"annotations": ["odd"]}}, None) == "mark"
