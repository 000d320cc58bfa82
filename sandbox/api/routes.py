"""URL paths → what they address, for the paths the real API server uses. Pure.

WHY: the official client builds URLs from its generated code (/api/v1/namespaces/{ns}/services/{name},
/apis/{group}/{version}/...); parsing them in one place keeps the HTTP layer thin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandbox.api import resources
from sandbox.api.errors import ApiError
from sandbox.api.resources import ResourceType


@dataclass(frozen=True)
class ResourceRoute:
    rt: ResourceType
    namespace: str | None  # None: cluster-scoped, or a list across all namespaces
    name: str | None
    subresource: str | None


@dataclass(frozen=True)
class DocumentRoute:
    """A fixed discovery/health document."""

    body: Any


def _not_found(path: str) -> ApiError:
    return ApiError(404, f"the server could not find the requested resource ({path})")


def parse(path: str, server_address: str) -> ResourceRoute | DocumentRoute:
    parts = [p for p in path.split("/") if p]
    if parts in (["healthz"], ["livez"], ["readyz"]):
        return DocumentRoute("ok")
    if parts == ["version"]:
        return DocumentRoute(resources.VERSION_INFO)
    if not parts or parts[0] not in ("api", "apis"):
        raise _not_found(path)
    if parts[0] == "api":
        if len(parts) == 1:
            return DocumentRoute(resources.core_versions(server_address))
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) == 1:
            return DocumentRoute(resources.group_list())
        if len(parts) == 2:
            doc = resources.api_group(parts[1])
            if doc is None:
                raise _not_found(path)
            return DocumentRoute(doc)
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        listing = resources.resource_list(group, version)
        if listing is None:
            raise _not_found(path)
        return DocumentRoute(listing)
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        inner = resources.lookup(group, version, rest[2])
        if inner is not None and inner.namespaced:
            namespace, rest = rest[1], rest[2:]
    rt = resources.lookup(group, version, rest[0])
    if rt is None or len(rest) > 3:
        raise _not_found(path)
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if rt.namespaced and name is not None and namespace is None:
        raise _not_found(path)
    if sub is not None and sub not in rt.subresources:
        raise _not_found(path)
    return ResourceRoute(rt, namespace, name, sub)
