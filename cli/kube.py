"""The CLI's only I/O with the API server, through the official ``kubernetes`` client.

WHY raw JSON (``_preload_content=False``): the policy works on Services as JSON dicts, and skipping the
client's model deserialisation is what keeps `status -A` over 10,000 Services to one paginated list
that finishes in seconds. Writes are JSON merge patches of single labels/annotations, never a PUT.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from shared import kube
from shared.errors import CliError
from shared.kube import Gone

PAGE_SIZE = 500
CONFLICT_RETRIES = 5
MERGE_PATCH = "application/merge-patch+json"
EVENT_TIMEOUT = 2.0  # seconds for one Event write (connect and read)

T = TypeVar("T")


class ClusterError(CliError, RuntimeError):
    """The API server refused or could not be reached; the message is meant for the user."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def connect(kubeconfig: str | None, context: str | None) -> tuple[Cluster, str]:
    """A Cluster for the kubeconfig/context (kubectl's rules: $KUBECONFIG, ~/.kube/config) and its namespace."""
    try:
        api = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        if context:
            active = next((x for x in contexts if x.get("name") == context), active)
    except (config.ConfigException, OSError, TypeError, ValueError) as exc:
        raise ClusterError(f"cannot load kubeconfig: {exc}") from exc
    namespace = str(((active or {}).get("context") or {}).get("namespace") or "default")
    return Cluster(api), namespace


def _message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (TypeError, ValueError):
        pass
    return str(exc.reason or exc.body or "error")


class Cluster:
    """Lists and minimal patches of Services and Namespaces; the Events the CLI reports on them."""

    def __init__(self, api: client.ApiClient, page_size: int = PAGE_SIZE) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.page_size = page_size
        self.server = str(api.configuration.host)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request; retry 409 Conflict (a concurrent write) a few times; turn errors into ClusterError."""
        for attempt in range(CONFLICT_RETRIES):
            try:
                return fn()
            except ApiException as exc:
                if exc.status == 409 and attempt + 1 < CONFLICT_RETRIES:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise ClusterError(f"{what}: {exc.status} {_message(exc)}", exc.status) from exc
            except urllib3.exceptions.HTTPError as exc:
                raise ClusterError(f"{what}: cannot reach the API server at {self.server}: {exc}") from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data = json.loads(response.data)
        if not isinstance(data, dict):
            raise ClusterError(f"unexpected answer from the API server: {str(data)[:200]}")
        return data

    def _paginate(self, what: str, fn: Callable[..., Any]) -> list[dict[str, Any]]:
        """One list, page by page (``shared.kube.pages``: limit + continue), so huge clusters need neither one
        giant response nor GETs; each page goes through ``_call`` (conflict retries, user-facing errors)."""
        def call(request: Callable[[], Any]) -> Any:
            try:
                return self._call(what, request)
            except Gone as exc:
                raise ClusterError(f"{what}: {exc} (the list took too long: run the command again)", 410) from exc

        return kube.list_items(fn, page_size=self.page_size, call=call)

    def list_services(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Services of one namespace, or of all (None). Items carry their namespace in metadata already."""
        if namespace is None:
            return self._paginate("list Services", self.core.list_service_for_all_namespaces)
        return self._paginate(
            f"list Services in {namespace}",
            lambda **kw: self.core.list_namespaced_service(namespace, **kw),
        )

    def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        """The Leases of one namespace (the node agents report readiness in theirs)."""
        coordination = client.CoordinationV1Api(self.api)
        try:
            return self._paginate(f"list Leases in {namespace}",
                                  lambda **kw: coordination.list_namespaced_lease(namespace, **kw))
        except ClusterError as exc:
            if exc.status == 404:  # no such namespace (or API): no agent reports there
                return []
            raise

    def list_namespaces(self) -> list[dict[str, Any]]:
        return self._paginate("list Namespaces", self.core.list_namespace)

    def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(
                self._call(
                    f"read Service {namespace}/{name}",
                    lambda: self.core.read_namespaced_service(name, namespace, _preload_content=False),
                )
            )
        except ClusterError as exc:
            if exc.status == 404:
                return None
            raise

    def patch_service(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._json(
            self._call(
                f"patch Service {namespace}/{name}",
                lambda: self.core.patch_namespaced_service(
                    name, namespace, patch, _content_type=MERGE_PATCH, _preload_content=False
                ),
            )
        )

    def create_event(self, namespace: str, body: dict[str, Any]) -> None:
        """Write one core/v1 Event. A short timeout: an Event is a report, it must not hold up a migration."""
        self._call(
            f"create Event in {namespace}",
            # a JSON dict is serialised as is (the client's typed model is only a hint)
            lambda: self.core.create_namespaced_event(namespace, body,  # type: ignore[arg-type]
                                                      _preload_content=False, _request_timeout=EVENT_TIMEOUT),
        )

    def list_webhook_configurations(self, label_selector: str) -> list[dict[str, Any]]:
        admission = client.AdmissionregistrationV1Api(self.api)
        return self._paginate("list MutatingWebhookConfigurations",
                              lambda **kw: admission.list_mutating_webhook_configuration(label_selector=label_selector,
                                                                                           **kw))

    def delete_webhook_configuration(self, name: str) -> None:
        admission = client.AdmissionregistrationV1Api(self.api)
        try:
            self._call(f"delete MutatingWebhookConfiguration {name}",
                       lambda: admission.delete_mutating_webhook_configuration(name, _preload_content=False))
        except ClusterError as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise

    def patch_namespace(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._json(
            self._call(
                f"patch Namespace {name}",
                lambda: self.core.patch_namespace(
                    name, patch, _content_type=MERGE_PATCH, _preload_content=False
                ),
            )
        )
