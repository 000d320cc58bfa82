"""The write pipeline, in kube-apiserver's order, without HTTP.

decode → scheme defaults → NamespaceLifecycle (404) → mutating admission (webhooks) → defaults again
→ [store, under its lock] validation → allocation → identity/resourceVersion → event.

WHY: the order is observable (a webhook never sees allocated clusterIPs on CREATE; an invalid patch
from a webhook is rejected by validation) and the components under test depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandbox.api import admission
from sandbox.api.defaulting import apply_defaults
from sandbox.api.errors import ApiError, conflict, invalid
from sandbox.api.patching import apply_patch
from sandbox.api.resources import MUTATING_WEBHOOKS, NAMESPACES, SERVICES, ResourceType
from sandbox.api.store import Store
from sandbox.api.strategy import prepare_for_update

Obj = dict[str, Any]
_PATCH_RETRIES = 5


def _check_body(rt: ResourceType, body: Any, namespace: str | None, name: str | None) -> Obj:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object (a {rt.kind})")
    if body.get("apiVersion") not in (None, rt.api_version):
        raise ApiError(400, f"the API version in the data ({body['apiVersion']}) does not match the expected "
                       f"API version ({rt.api_version})")
    if body.get("kind") not in (None, rt.kind):
        raise ApiError(400, f"the kind in the data ({body['kind']}) does not match the expected kind ({rt.kind})")
    meta = body.get("metadata")
    if meta is None:
        meta = body["metadata"] = {}
    if not isinstance(meta, dict):
        raise ApiError(400, "metadata must be a JSON object")
    if rt.namespaced:
        if meta.get("namespace") not in (None, "", namespace):
            raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
        meta["namespace"] = namespace
    else:
        meta.pop("namespace", None)
    if name is not None and meta.get("name") not in (None, "", name):
        raise ApiError(400, f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
    if name is not None:
        meta["name"] = name
    return body


class Operations:
    """create / replace / patch / delete for one store, with admission through `resolve`."""

    def __init__(
        self,
        store: Store,
        resolve: admission.Resolver,
        log: Callable[[dict[str, Any]], None],
    ) -> None:
        self.store = store
        self.resolve = resolve
        self.log = log

    def _admit(self, req: admission.Request) -> tuple[Obj, list[str]]:
        if req.rt is MUTATING_WEBHOOKS:  # the real server never calls webhooks for webhook configurations
            return req.obj, []
        configs = self.store.webhook_configurations()
        if not configs:
            return req.obj, []
        ns_labels = self.store.namespace_labels(req.namespace) if req.namespace else None
        obj, warnings = admission.admit(req, configs, ns_labels, self.resolve, self.log)
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if not isinstance(meta, dict):
            raise ApiError(500, "Internal error occurred: admission webhooks removed the object's metadata",
                           reason="InternalError")
        if (req.rt.namespaced and meta.get("namespace") != req.namespace) or (req.name and meta.get("name") != req.name):
            raise ApiError(500, "Internal error occurred: admission webhooks may not change metadata.name or "
                           "metadata.namespace", reason="InternalError")
        return apply_defaults(req.rt.kind, obj), warnings

    def _require_namespace(self, rt: ResourceType, namespace: str | None) -> None:
        if rt.namespaced and self.store.namespace_labels(namespace or "") is None:
            raise ApiError(404, f'namespaces "{namespace}" not found', details={"name": namespace, "kind": "namespaces"})

    def create(self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False) -> tuple[Obj, list[str]]:
        obj = apply_defaults(rt.kind, _check_body(rt, body, namespace, None))
        meta = obj["metadata"]
        if not meta.get("name") and not meta.get("generateName"):
            raise invalid(rt.kind, "", [("metadata.name", "Required value: name or generateName is required")])
        self._require_namespace(rt, namespace)
        req = admission.Request(rt, "CREATE", namespace, meta.get("name") or "", obj, None, None, dry_run)
        obj, warnings = self._admit(req)
        return self.store.create(rt, obj, dry_run=dry_run), warnings

    def _update(
        self,
        rt: ResourceType,
        obj: Obj,
        old: Obj,
        subresource: str | None,
        precondition_rv: str | None,
        dry_run: bool,
    ) -> tuple[Obj, list[str]]:
        if precondition_rv and precondition_rv != old["metadata"]["resourceVersion"]:
            raise conflict(rt.group, rt.plural, old["metadata"]["name"])
        obj = prepare_for_update(rt, apply_defaults(rt.kind, obj), old, subresource)
        meta = obj["metadata"]
        req = admission.Request(rt, "UPDATE", meta.get("namespace"), meta["name"], obj, old, subresource, dry_run)
        obj, warnings = self._admit(req)
        new = self.store.update(rt, obj, subresource=subresource, precondition_rv=precondition_rv, dry_run=dry_run)
        return new, warnings

    def replace(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        subresource: str | None,
        body: Any,
        *,
        dry_run: bool = False,
    ) -> tuple[Obj, list[str]]:
        obj = _check_body(rt, body, namespace, name)
        old = self.store.get(rt, namespace, name)
        precondition = obj["metadata"].get("resourceVersion") or None
        return self._update(rt, obj, old, subresource, precondition, dry_run)

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        subresource: str | None,
        content_type: str,
        raw: bytes,
        *,
        dry_run: bool = False,
    ) -> tuple[Obj, list[str]]:
        """Apply the patch to the stored object; retry when someone else wrote in between, unless the
        patch itself carried a resourceVersion (then it is a precondition: 409)."""
        for attempt in range(_PATCH_RETRIES):
            old = self.store.get(rt, namespace, name)
            patched = apply_patch(old, content_type, raw)
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise ApiError(422, f'{rt.kind} "{name}" is invalid: the patched object must be a JSON object with metadata')
            old_meta, meta = old["metadata"], patched["metadata"]
            if meta.get("name") != name or (rt.namespaced and meta.get("namespace") != namespace):
                raise invalid(rt.kind, name, [("metadata.name", "Invalid value: field is immutable")])
            rv = meta.get("resourceVersion")
            explicit = rv is not None and rv != old_meta.get("resourceVersion")
            try:
                return self._update(rt, patched, old, subresource, rv or old_meta["resourceVersion"], dry_run)
            except ApiError as exc:
                if exc.reason != "Conflict" or explicit or attempt == _PATCH_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        dry_run: bool = False,
    ) -> Obj:
        options = body if isinstance(body, dict) else {}
        pre = options.get("preconditions") or {}
        dry_run = dry_run or "All" in (options.get("dryRun") or [])
        gone = self.store.delete(rt, namespace, name, precondition_uid=pre.get("uid"),
                                 precondition_rv=pre.get("resourceVersion"), dry_run=dry_run)
        if rt in (SERVICES, NAMESPACES):
            return gone
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": gone["metadata"].get("uid")},
        }
