"""Malformed requests against the real server: each gets its specified answer, and the server keeps
serving afterwards. Not an AdmissionReview v1 -> HTTP 400 with a clear message; a valid envelope
with something we do not understand inside -> 200, allowed, no patch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.webhook.conftest import HOSTNAME, Webhook, metric
from tests.webhook.test_server import read_response, review

MIB = 1024 * 1024


def envelope(**request: Any) -> dict[str, Any]:
    doc = review(uid="bad-1")
    doc["request"].update(request)
    return doc


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("truncated JSON", raw(review())[:-7], "body is not valid JSON"),
    ("empty body", b"", "body is not valid JSON"),
    ("not UTF-8", b'{"apiVersion": "\xff\xfe"}', "body is not valid JSON"),
    ("deeply nested JSON", b'{"a": ' + b"[" * 200_000, "body is not valid JSON: nested too deeply"),
    ("JSON array", b"[1, 2]", "body must be a JSON object"),
    ("JSON string", b'"AdmissionReview"', "body must be a JSON object"),
    ("wrong apiVersion", raw({**review(), "apiVersion": "admission.k8s.io/v1beta1"}), "apiVersion must be admission.k8s.io/v1"),
    ("apiVersion of wrong type", raw({**review(), "apiVersion": 1}), "apiVersion must be"),
    ("wrong kind", raw({**review(), "kind": "TokenReview"}), "kind must be AdmissionReview"),
    ("missing request", raw({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), "request must be an object"),
    ("request of wrong type", raw({**review(), "request": ["uid"]}), "request must be an object"),
    ("missing uid", raw({**review(), "request": {"operation": "CREATE"}}), "request.uid must be a non-empty string"),
    ("uid of wrong type", raw(envelope(uid={"id": 1})), "request.uid must be a non-empty string"),
    # Python refuses to parse an int of more than 4,300 digits (a plain ValueError, once a 500).
    ("huge integer in the object", raw(review()).replace(b'"port": 80', b'"port": ' + b"7" * 5000),
     "body is not valid JSON: a number has more than 4300 digits"),
    ("huge integer as uid", raw(review()).replace(b'"uid": "uid-1"', b'"uid": ' + b"9" * 4301),
     "body is not valid JSON: a number has more than 4300 digits"),
]

ALLOWED_UNTOUCHED: list[tuple[str, dict[str, Any], str]] = [
    ("unknown operation", envelope(operation="PATCH"), "unknown operation PATCH"),
    ("operation of wrong type", envelope(operation=["CREATE"]), "unknown operation"),
    ("DELETE", envelope(operation="DELETE"), "operation DELETE is never mutated"),
    ("CONNECT", envelope(operation="CONNECT"), "operation CONNECT is never mutated"),
    ("missing kind", envelope(kind=None), "not a v1 Service"),
    ("non-Service kind", envelope(kind={"group": "apps", "version": "v1", "kind": "Deployment"}), "not a v1 Service"),
    ("non-v1 Service", envelope(kind={"group": "", "version": "v1beta1", "kind": "Service"}), "not a v1 Service"),
    ("missing object", envelope(object=None), "request.object is not an object"),
    ("object of wrong type", envelope(object="Service"), "request.object is not an object"),
    ("metadata of wrong type", envelope(object={"metadata": [], "spec": {}}), "metadata is not an object"),
    ("status subresource", envelope(subResource="status"), "subresource status is never mutated"),
]


def post_raw(webhook: Webhook, body: bytes, extra_headers: str = "") -> tuple[int, dict[str, Any]]:
    with webhook.tls_socket() as tls:
        head = (f"POST /mutate HTTP/1.1\r\nHost: {HOSTNAME}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{extra_headers}\r\n")
        tls.sendall(head.encode() + body)
        return read_response(tls)


def assert_still_serving(webhook: Webhook) -> None:
    status, body = post_raw(webhook, raw(review(uid="good-after-bad")))
    assert status == 200 and body["response"]["uid"] == "good-after-bad" and "patch" in body["response"]


@pytest.mark.parametrize(("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_not_an_admission_review_is_a_400(webhook: Webhook, case: str, body: bytes, message: str) -> None:
    status, answer = post_raw(webhook, body)
    assert status == 400, case
    assert message in answer["detail"]
    assert_still_serving(webhook)


@pytest.mark.parametrize(("case", "doc", "reason"), ALLOWED_UNTOUCHED, ids=[c[0] for c in ALLOWED_UNTOUCHED])
def test_not_understood_is_allowed_without_patch(webhook: Webhook, case: str, doc: dict[str, Any], reason: str) -> None:
    status, answer = post_raw(webhook, raw(doc))
    assert status == 200, case
    resp = answer["response"]
    assert resp["uid"] == "bad-1" and resp["allowed"] is True and "patch" not in resp and "patchType" not in resp
    assert resp["auditAnnotations"]["decision"] == "skip" and reason in resp["auditAnnotations"]["reason"]
    assert_still_serving(webhook)


def test_declared_huge_body_is_refused_before_it_is_sent(webhook: Webhook) -> None:
    with webhook.tls_socket() as tls:
        tls.sendall((f"POST /mutate HTTP/1.1\r\nHost: {HOSTNAME}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {4 * MIB}\r\n\r\n").encode() + b'{"apiVersion": ')
        status, answer = read_response(tls)  # answered without the other 4 MiB ever being sent
    assert status == 400 and "exceeds the 3145728-byte limit" in answer["detail"]
    assert_still_serving(webhook)


def test_streamed_huge_body_is_cut_off_at_the_limit(webhook: Webhook) -> None:
    chunk = b" " * (256 * 1024)
    with webhook.tls_socket() as tls:
        tls.sendall(f"POST /mutate HTTP/1.1\r\nHost: {HOSTNAME}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(13):  # 3.25 MiB, no Content-Length to go by
            tls.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, answer = read_response(tls)
    assert status == 400 and "body exceeds the 3145728-byte limit" in answer["detail"]
    assert_still_serving(webhook)


def test_a_body_just_under_the_limit_is_read(webhook: Webhook) -> None:
    doc = review(uid="big-but-fine")
    doc["request"]["object"]["metadata"]["annotations"] = {"padding": "x" * (3 * MIB - 4096)}
    status, answer = post_raw(webhook, raw(doc))
    assert status == 200 and answer["response"]["uid"] == "big-but-fine"


def test_bad_requests_are_counted(webhook: Webhook) -> None:
    post_raw(webhook, b"{")
    assert metric(webhook.metrics(), "lightpath_webhook_errors_total", kind="bad_request") == 1
    with webhook.client() as client:
        r = webhook.request(client, "GET", "/mutate")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
