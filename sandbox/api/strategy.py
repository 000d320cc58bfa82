"""Per-kind create/update strategy: which fields the server owns and how they survive an update.

WHY: like the real REST strategies, this is where server-owned metadata (uid, creationTimestamp,
generation) is stamped and preserved, and where the main resource and its /status subresource each
keep the other's half. Pure functions on dicts; the store calls them under its lock.
"""

from __future__ import annotations

import copy
import datetime
import secrets
import string
import uuid
from typing import Any

from sandbox.api.errors import invalid
from sandbox.api.resources import ENDPOINTSLICES, NAMESPACES, SERVICES, ResourceType

SERVER_OWNED_META = ("uid", "creationTimestamp", "generation", "resourceVersion")
_SUFFIX_ALPHABET = "".join(c for c in string.ascii_lowercase + string.digits if c not in "aeiou013")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def generate_name(prefix: str) -> str:
    """generateName: prefix + 5 random characters, as the real name generator does."""
    return prefix[:58] + "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(5))


def _initial_status(rt: ResourceType) -> dict[str, Any] | None:
    if rt is SERVICES:
        return {"loadBalancer": {}}
    if rt is NAMESPACES:
        return {"phase": "Active"}
    return None


def prepare_for_create(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp identity (everything but resourceVersion, which the store assigns at commit)."""
    out = copy.deepcopy(obj)
    out["apiVersion"], out["kind"] = rt.api_version, rt.kind
    meta = out["metadata"]
    for key in SERVER_OWNED_META:
        meta.pop(key, None)
    meta.pop("deletionTimestamp", None)
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now_rfc3339()
    meta["generation"] = 1
    status = _initial_status(rt)
    if status is not None:
        out["status"] = status
    return out


def prepare_for_update(
    rt: ResourceType,
    new: dict[str, Any],
    old: dict[str, Any],
    subresource: str | None,
) -> dict[str, Any]:
    """Keep server-owned metadata from `old`; the main resource keeps the old status, /status keeps
    everything but the status."""
    if subresource == "status":
        out = copy.deepcopy(old)
        out["status"] = copy.deepcopy(new.get("status") or {})
        return out
    out = copy.deepcopy(new)
    out["apiVersion"], out["kind"] = rt.api_version, rt.kind
    meta = out.setdefault("metadata", {})
    old_meta = old.get("metadata") or {}
    for key in ("uid", "creationTimestamp", "generation", "name", "namespace"):
        if key in old_meta:
            meta[key] = old_meta[key]
    if "status" in old or rt in (SERVICES, NAMESPACES):
        if "status" in old:
            out["status"] = copy.deepcopy(old["status"])
        else:
            out.pop("status", None)
    if rt is ENDPOINTSLICES and out.get("addressType") != old.get("addressType"):
        raise invalid(rt.kind, meta.get("name", ""), [("addressType", f"Invalid value: {out.get('addressType')!r}: field is immutable")])
    return out


def _without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """The object minus what a no-op write would change anyway (resourceVersion, managedFields)."""
    out = dict(obj)
    out["metadata"] = _without(obj.get("metadata") or {}, "resourceVersion", "managedFields")
    return out


def next_generation(rt: ResourceType, new: dict[str, Any], old: dict[str, Any]) -> int:
    """generation counts changes to the desired state: spec (or, for kinds without spec, the body)."""
    generation = int((old.get("metadata") or {}).get("generation") or 1)
    if "spec" in new or "spec" in old:
        changed = new.get("spec") != old.get("spec")
    else:
        changed = _without(new, "metadata", "status") != _without(old, "metadata", "status")
    return generation + 1 if changed else generation
