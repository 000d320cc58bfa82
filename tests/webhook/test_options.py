"""Webhook: config.lightpath.cloud/ annotations checked on CREATE and UPDATE with the control plane's own
parser; unknown options and invalid values are warnings, never a denial, and the warnings stay bounded."""

from __future__ import annotations

from typing import Any

import pytest

from shared import constants as c
from shared.policy import PolicyConfig
from webhook.review import MAX_OPTION_WARNINGS, admit, parse_review

P = "config.lightpath.cloud/"
CONFIG = PolicyConfig()
OPTED_IN = {c.OPT_LABEL: c.OPT_ENABLED}


def review(annotations: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    obj = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
           "spec": {"ports": [{"name": "http", "port": 80, "appProtocol": "http"}, {"name": "db", "port": 5432}]}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Service"}, "operation": operation,
                        "namespace": "shop", "object": obj}}


def answer(annotations: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    response: dict[str, Any] = admit(parse_review(review(annotations, operation)), OPTED_IN, CONFIG).review["response"]
    return response


@pytest.mark.parametrize("operation", ["CREATE", "UPDATE"])
def test_bad_options_are_warnings_and_the_service_is_still_admitted(operation: str) -> None:
    response = answer({P + "http-num-retries": "lots", P + "web-lb-policy": "RANDOM", P + "frobnicate": "1",
                       P + "http-lb-policy": "FASTEST", P + "db-request-timeout": "-1s"}, operation)
    assert response["allowed"] is True and "patch" in response  # labelled as it would be without them
    options = [w for w in response["warnings"] if P in w]
    assert len(options) == 5
    joined = "\n".join(options)
    for words in ("'lots' is not a whole number", "no port is named 'web'", "frobnicate: unknown option",
                  "'FASTEST' is not one of", "db-request-timeout"):
        assert words in joined, (words, joined)
    assert all(w.startswith("lightpath: Service web: ") and len(w) <= 256 and w.isascii() for w in options)


def test_an_http_only_outlier_option_on_a_tcp_port_is_a_warning() -> None:
    response = answer({P + "db-outlier-detection-consecutive-5xx": "2"})
    assert response["allowed"] is True
    options = [w for w in response["warnings"] if P in w]
    assert len(options) == 1 and "db-outlier-detection-consecutive-5xx: applies to HTTP ports only" in options[0]
    assert len(options[0]) <= 256


def test_valid_options_and_other_annotations_give_no_warning() -> None:
    response = answer({P + "http-num-retries": "3", P + "lb-policy": "round_robin", "example.com/x": "?"})
    assert not [w for w in response.get("warnings", []) if P in w]


def test_warnings_are_bounded_whatever_the_input() -> None:
    many = {P + f"x{i}-" + "y" * 300: "z" * 10_000 for i in range(500)}
    response = answer(many)
    options = [w for w in response["warnings"] if P in w or "more option problems" in w]
    assert len(options) == MAX_OPTION_WARNINGS + 1 and "495 more option problems" in options[-1]
    assert all(len(w) <= 256 for w in response["warnings"])
    assert response["allowed"] is True


def test_odd_annotations_never_break_the_review() -> None:
    for odd in ({P + "num-retries": 3}, {P + "num-retries": None}, {P: "1"}, {P + "\u00e9\n": "\x00"}):
        response = answer(odd)
        assert response["allowed"] is True and all(w.isascii() and w.isprintable() for w in response["warnings"])
