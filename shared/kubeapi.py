"""The long-running components' calls to the Kubernetes API (the node agent, the webhook): a resource path
and query parameters sent through the official client's ``ApiClient`` (its configuration, authentication, TLS and REST layer, unchanged), without
the generated API classes.

WHY: the generated classes of the ``kubernetes`` client (v37) wrap every method in pydantic validation and
cost memory as soon as one is touched: ``CoreV1Api`` alone adds 21.5 MiB to a process, ``AppsV1Api`` 4 MiB
(measured in docs/performance.md) -- a tenth of the agent's budget at 10,000 Services, for calls whose
answers the agent reads as raw JSON anyway. The few kinds they use are named here once. (The CLI, a
short-lived process, keeps the generated classes behind ``cli.kube.Cluster``.)

Errors are the client's: a non-2xx answer raises ``ApiException`` with its status, reason and body, exactly
as the generated methods do, so callers keep one way to tell 404 from 410 from 500.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes.client.exceptions import ApiException

Timeout = float | tuple[float, float] | None


@dataclass(frozen=True, slots=True)
class Kind:
    """A resource collection: ``group_version`` ("v1" for the core group, else "group/version") and its plural."""

    group_version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The REST path; ``namespace=None`` on a namespaced kind means across all namespaces."""
        root = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        if namespace is not None:
            if not self.namespaced:
                raise ValueError(f"{self.plural} are not namespaced")
            root = f"{root}/namespaces/{quote(namespace, safe='')}"
        path = f"{root}/{self.plural}"
        return path if name is None else f"{path}/{quote(name, safe='')}"


SERVICES = Kind("v1", "services")
NAMESPACES = Kind("v1", "namespaces", namespaced=False)
EVENTS = Kind("v1", "events")
NODES = Kind("v1", "nodes", namespaced=False)
ENDPOINT_SLICES = Kind("discovery.k8s.io/v1", "endpointslices")
DAEMON_SETS = Kind("apps/v1", "daemonsets")
LEASES = Kind("coordination.k8s.io/v1", "leases")

# The generated list methods' keyword arguments (what shared.kube's pager and Reflector pass) -> the API's
# query parameters. Anything else is a programming error: raised, never sent.
_LIST_QUERY = {
    "label_selector": "labelSelector", "field_selector": "fieldSelector", "limit": "limit",
    "_continue": "continue", "resource_version": "resourceVersion", "resource_version_match": "resourceVersionMatch",
    "watch": "watch", "allow_watch_bookmarks": "allowWatchBookmarks", "timeout_seconds": "timeoutSeconds",
}
MERGE_PATCH = "application/merge-patch+json"


class Api:
    """Requests for ``Kind`` s over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def lister(self, kind: Kind, namespace: str | None = None) -> Callable[..., Any]:
        """A list (or watch) call shaped like a generated ``list_*`` method, for ``shared.kube``."""
        return functools.partial(self.read_list, kind, namespace)

    def read_list(self, kind: Kind, namespace: str | None = None, *, _preload_content: bool = True,
             _request_timeout: Timeout = None, **params: Any) -> Any:
        """GET the collection: the decoded JSON, or (``_preload_content=False``) the raw urllib3 response for
        the caller to stream and release (a watch, or a page read as bytes)."""
        query: list[tuple[str, Any]] = []
        for key, value in params.items():
            name = _LIST_QUERY.get(key)
            if name is None:
                raise TypeError(f"unknown list parameter {key!r} (known: {', '.join(sorted(_LIST_QUERY))})")
            if value is not None:
                query.append((name, value))
        return self._call("GET", kind.path(namespace), query=query, timeout=_request_timeout, raw=not _preload_content)

    def get(self, kind: Kind, namespace: str | None, name: str, *, timeout: Timeout = None) -> Any:
        return self._call("GET", kind.path(namespace, name), timeout=timeout)

    def create(self, kind: Kind, namespace: str | None, body: dict[str, Any], *, timeout: Timeout = None) -> Any:
        return self._call("POST", kind.path(namespace), body=body, timeout=timeout)

    def patch(self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any], *,
              content_type: str = MERGE_PATCH, timeout: Timeout = None) -> Any:
        return self._call("PATCH", kind.path(namespace, name), body=body, content_type=content_type, timeout=timeout)

    def replace(self, kind: Kind, namespace: str | None, name: str, body: dict[str, Any], *,
                timeout: Timeout = None) -> Any:
        """PUT: the body's ``metadata.resourceVersion`` makes it a compare-and-swap (409 when it moved)."""
        return self._call("PUT", kind.path(namespace, name), body=body, timeout=timeout)

    def _call(self, method: str, path: str, *, query: list[tuple[str, Any]] | None = None,
              body: dict[str, Any] | None = None, content_type: str | None = None, timeout: Timeout = None,
              raw: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        request = self.api_client.param_serialize(method=method, resource_path=path, query_params=query or None,
                                                  header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        if raw:
            return resp.response
        return json.loads(resp.read())
