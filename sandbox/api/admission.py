"""Mutating admission, as kube-apiserver's MutatingAdmissionWebhook plugin does it.

WHY: the lightpath webhook is only proven if a server calls it the way a cluster does: matched by
rules and namespace/object selectors, over HTTPS verified against the caBundle with the hostname
`<service>.<namespace>.svc`, with failurePolicy and timeouts honoured and the JSONPatch applied.
Matching is pure (`webhook_applies`); `call_webhook` and `admit` are the I/O shell.
Not implemented: reinvocationPolicy IfNeeded (each webhook is called once, in configuration order),
matchConditions, and admission on DELETE/CONNECT.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sandbox.api.errors import ApiError
from sandbox.api.label_selectors import from_label_selector_object, matches
from sandbox.api.patching import apply_json_patch
from sandbox.api.resources import NAMESPACES, ResourceType
from shared.errors import SandboxError

USER_INFO = {"username": "sandbox-admin", "uid": "sandbox-admin", "groups": ["system:masters", "system:authenticated"]}

# (namespace, service name) -> (host, port) where that webhook Service really listens.
Resolver = Callable[[str, str], tuple[str, int] | None]


class WebhookCallError(SandboxError):
    """Calling the webhook failed (connect, TLS, timeout, bad response): failurePolicy decides."""


@dataclass(frozen=True)
class Request:
    rt: ResourceType
    operation: str  # CREATE | UPDATE
    namespace: str | None
    name: str
    obj: dict[str, Any]
    old: dict[str, Any] | None
    subresource: str | None = None
    dry_run: bool = False


def _resource_matches(entry: str, plural: str, sub: str | None) -> bool:
    res, _, res_sub = entry.partition("/")
    if sub is None:
        return not res_sub and res in ("*", plural)
    return res in ("*", plural) and res_sub in ("*", sub)


def rule_matches(rule: Mapping[str, Any], req: Request) -> bool:
    rt = req.rt
    scope = rule.get("scope") or "*"
    return (
        any(op in ("*", req.operation) for op in rule.get("operations") or [])
        and any(g in ("*", rt.group) for g in rule.get("apiGroups") or [])
        and any(v in ("*", rt.version) for v in rule.get("apiVersions") or [])
        and any(_resource_matches(r, rt.plural, req.subresource) for r in rule.get("resources") or [])
        and (scope == "*" or scope == ("Namespaced" if rt.namespaced else "Cluster"))
    )


def _labels(obj: Mapping[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def webhook_applies(hook: Mapping[str, Any], req: Request, namespace_labels: Mapping[str, str] | None) -> bool:
    """Rules, then namespaceSelector (a Namespace is matched by its own labels; other cluster-scoped
    objects ignore it), then objectSelector (new or old object's labels)."""
    if not any(rule_matches(r, req) for r in hook.get("rules") or []):
        return False
    ns_sel = from_label_selector_object(hook.get("namespaceSelector"), "namespaceSelector")
    if req.rt is NAMESPACES:
        if not matches(ns_sel, _labels(req.obj)):
            return False
    elif req.rt.namespaced and not matches(ns_sel, namespace_labels or {}):
        return False
    obj_sel = from_label_selector_object(hook.get("objectSelector"), "objectSelector")
    return matches(obj_sel, _labels(req.obj)) or (req.old is not None and matches(obj_sel, _labels(req.old)))


def build_review(req: Request, obj: Mapping[str, Any], uid: str) -> dict[str, Any]:
    rt = req.rt
    kind = {"group": rt.group, "version": rt.version, "kind": rt.kind}
    resource = {"group": rt.group, "version": rt.version, "resource": rt.plural}
    options_kind = "CreateOptions" if req.operation == "CREATE" else "UpdateOptions"
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": req.name,
        "operation": req.operation,
        "userInfo": USER_INFO,
        "object": obj,
        "oldObject": req.old,
        "dryRun": req.dry_run,
        "options": {"kind": options_kind, "apiVersion": "meta.k8s.io/v1"},
    }
    if req.namespace:
        request["namespace"] = req.namespace
    if req.subresource:
        request["subResource"] = request["requestSubResource"] = req.subresource
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}


class _VerifiedHTTPSConnection(http.client.HTTPSConnection):
    """Connect to (host, port) but verify the certificate for `server_hostname` (the Service DNS name)."""

    def __init__(self, host: str, port: int, server_hostname: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_hostname = server_hostname
        self._ssl_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self._server_hostname)
        except BaseException:
            sock.close()
            raise


def _target(hook: Mapping[str, Any], resolve: Resolver) -> tuple[str, int, str, str, str, str]:
    """(connect host, connect port, TLS hostname, request path, URL for messages, Host header)."""
    cc = hook.get("clientConfig") or {}
    if cc.get("url"):
        url = urlsplit(cc["url"])
        if url.scheme != "https" or not url.hostname:
            raise WebhookCallError(f"invalid webhook URL {cc['url']!r}")
        port = url.port or 443
        path = url.path or "/"
        query = f"?{url.query}" if url.query else ""
        return url.hostname, port, url.hostname, path + query, cc["url"], url.netloc.rpartition("@")[2]
    svc = cc.get("service") or {}
    ns, name, port = svc.get("namespace", ""), svc.get("name", ""), int(svc.get("port") or 443)
    hostname = f"{name}.{ns}.svc"
    path = svc.get("path") or "/"
    url = f"https://{hostname}:{port}{path}"
    route = resolve(ns, name)
    if route is None:
        raise WebhookCallError(f'Post "{url}": service "{ns}/{name}" has no route in the sandbox (route_service)')
    return route[0], route[1], hostname, path, url, f"{hostname}:{port}"


def call_webhook(hook: Mapping[str, Any], review: Mapping[str, Any], resolve: Resolver) -> dict[str, Any]:
    """POST the AdmissionReview; return its `response` (WebhookCallError on any failure)."""
    timeout = float(hook.get("timeoutSeconds") or 10)
    host, port, hostname, path, url, host_header = _target(hook, resolve)
    ca_bundle = (hook.get("clientConfig") or {}).get("caBundle")
    try:
        cadata = base64.b64decode(ca_bundle).decode() if ca_bundle else None
        context = ssl.create_default_context(cadata=cadata) if cadata else ssl.create_default_context()
    except (ValueError, ssl.SSLError) as exc:
        raise WebhookCallError(f'Post "{url}": bad caBundle: {exc}') from exc
    sep = "&" if "?" in path else "?"
    conn = _VerifiedHTTPSConnection(host, port, hostname, context, timeout)
    try:
        body = json.dumps(review).encode()
        conn.request(
            "POST",
            f"{path}{sep}timeout={int(timeout)}s",
            body=body,
            headers={"Host": host_header, "Content-Type": "application/json", "Accept": "application/json"},
        )
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise WebhookCallError(f'failed to call webhook: Post "{url}": {exc}') from exc
    finally:
        conn.close()
    if resp.status != 200:
        raise WebhookCallError(f'Post "{url}": expected response code 200, got {resp.status}: {data[:200]!r}')
    try:
        answer = json.loads(data)
        response = answer["response"]
        if not isinstance(response, dict):
            raise TypeError("response is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise WebhookCallError(f"received invalid webhook response: {exc}") from exc
    if response.get("uid") != review["request"]["uid"]:
        raise WebhookCallError(
            f"expected response.uid={review['request']['uid']!r}, got {response.get('uid')!r}")
    return response


def _broken(name: str, what: str) -> ApiError:
    """kube-apiserver's answer when webhook ``name`` returned something it cannot use."""
    return ApiError(500, f'Internal error occurred: admission webhook "{name}" {what}', reason="InternalError")


def _decode_patch(response: Mapping[str, Any], name: str) -> list[Any] | None:
    patch = response.get("patch")
    if not patch:
        return None
    if response.get("patchType") != "JSONPatch":
        raise _broken(name, f"returned unsupported patchType {response.get('patchType')!r}")
    try:
        ops = json.loads(base64.b64decode(patch))
    except ValueError as exc:
        raise _broken(name, f"returned an undecodable patch: {exc}") from exc
    if not isinstance(ops, list):
        raise _broken(name, "returned a patch that is not a JSON array")
    return ops


def _apply(obj: dict[str, Any], ops: list[Any], name: str) -> dict[str, Any]:
    try:
        out = apply_json_patch(obj, ops)
    except ApiError as exc:
        raise _broken(name, f"returned a patch that does not apply: {exc.message}") from exc
    if not isinstance(out, dict):
        raise _broken(name, "patched the object into a non-object")
    return out


def admit(
    req: Request,
    configurations: list[dict[str, Any]],
    namespace_labels: Mapping[str, str] | None,
    resolve: Resolver,
    log: Callable[[dict[str, Any]], None],
) -> tuple[dict[str, Any], list[str]]:
    """Run every matching webhook in order; return the mutated object and the warnings to surface."""
    obj, warnings = req.obj, []
    for config in configurations:
        for hook in config.get("webhooks") or []:
            current = Request(req.rt, req.operation, req.namespace, req.name, obj, req.old, req.subresource, req.dry_run)
            if not webhook_applies(hook, current, namespace_labels):
                continue
            name, uid = hook.get("name", ""), str(uuid.uuid4())
            entry: dict[str, Any] = {
                "uid": uid, "webhook": name, "operation": req.operation, "resource": req.rt.plural,
                "namespace": req.namespace, "name": req.name, "dryRun": req.dry_run,
                "allowed": None, "patched": False, "warnings": [], "error": None,
            }
            try:
                response = call_webhook(hook, build_review(current, obj, uid), resolve)
            except WebhookCallError as exc:
                entry["error"] = str(exc)
                ignored = hook.get("failurePolicy") == "Ignore"
                entry["allowed"] = ignored
                log(entry)
                if ignored:
                    continue
                raise ApiError(500, f'Internal error occurred: failed calling webhook "{name}": {exc}',
                               reason="InternalError") from exc
            entry["allowed"] = bool(response.get("allowed"))
            entry["warnings"] = [str(w) for w in response.get("warnings") or []]
            warnings += entry["warnings"]
            if not response.get("allowed"):
                log(entry)
                status = response.get("status") or {}
                code = int(status.get("code") or 400)
                message = status.get("message") or "without explanation"
                raise ApiError(max(code, 400), f'admission webhook "{name}" denied the request: {message}',
                               reason=status.get("reason") or None)
            try:  # a bad patch is the webhook's bug: 500 whatever the failurePolicy, as in kube-apiserver
                ops = _decode_patch(response, name)
                if ops is not None:
                    obj = _apply(obj, ops, name)
                    entry["patched"] = True
            except ApiError as exc:
                entry["error"] = exc.message
                log(entry)
                raise
            log(entry)
    return obj, warnings
