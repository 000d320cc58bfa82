"""SandboxApiServer: a TEST DOUBLE of the Kubernetes API server. Not a cluster.

It speaks the real wire protocol (JSON over plain HTTP/1.1 on loopback) to the real, unmodified
`kubernetes` Python client, kubectl and our components, for four resources: v1 namespaces, v1 services
(+ /status), discovery.k8s.io/v1 endpointslices and admissionregistration.k8s.io/v1
mutatingwebhookconfigurations. It implements get/list (label and field selectors, limit/continue
pagination over a consistent snapshot), watch (replay from a resourceVersion, synthetic ADDED for ""/"0",
bookmarks, selector-transition DELETED/ADDED, 410 Expired, timeoutSeconds), create/replace/patch
(JSON, merge, simplified strategic merge)/delete, Service defaulting and cluster IP / node port
allocation (IPv4, IPv6, dual-stack), minimal validation, and mutating admission webhooks over verified TLS.

It does NOT implement: authentication/authorization, other resources, protobuf/CBOR/YAML, server-side
apply, managedFields, finalizers and graceful deletion (deletes are immediate; a Namespace delete
removes everything in it at once), validating webhooks, webhook reinvocation,
deleteCollection, or any controller (no EndpointSlice controller, no load balancers, no Service
networking). docs/sandbox.md has the full list.

Fault injection for tests: `compact()`, `stall_watches(on)`, `forbid(resource, verb)` (a 403 as RBAC would
answer), `stop()` then `start()` on the same port.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import kubernetes.client
import yaml

from sandbox.api.allocation import ServiceAllocator
from sandbox.api.errors import ApiError
from sandbox.api.handler import SandboxHTTPServer
from sandbox.api.operations import Operations
from sandbox.api.resources import ResourceType
from sandbox.api.store import Store


class SandboxApiServer:
    """The double. Its state (objects, resourceVersion, history) survives stop()/start()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        history_limit: int = 1000,
        bookmark_interval: float = 1.0,
        service_cidr: str | None = "10.96.0.0/16",
        service_cidr_v6: str | None = "fd00:10:96::/112",
        node_port_range: tuple[int, int] = (30000, 32767),
    ) -> None:
        if bookmark_interval <= 0:
            raise ValueError("bookmark_interval must be positive")
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.store = Store(
            history_limit=history_limit,
            allocator=ServiceAllocator(service_cidr, service_cidr_v6, node_port_range),
        )
        self.admission_log: list[dict[str, Any]] = []
        self._log_lock = threading.Lock()
        self._routes: dict[tuple[str, str], tuple[str, int]] = {}
        self.operations = Operations(self.store, self._resolve, self._record_admission)
        self.stopping = threading.Event()
        self.stalled = threading.Event()
        self._gate = threading.Condition()  # stall_watches(True) waits for in-flight sends to finish
        self._sending = 0
        self._forbidden: set[tuple[ResourceType, str]] = set()
        self._httpd: SandboxHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SandboxApiServer:
        if self._httpd is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.stopping.clear()
        self._httpd = SandboxHTTPServer((self.host, self.port), self, family)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name=f"sandbox-apiserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (watch streams end abruptly, as when an API
        server dies). The port is kept, so start() brings the same URL back."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        self.store.close_all_watches()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> SandboxApiServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- client helpers ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def api_client(self) -> kubernetes.client.ApiClient:
        config = kubernetes.client.Configuration()
        config.host = self.url
        return kubernetes.client.ApiClient(config)

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig whose current context "sandbox" points at this server (no credentials)."""
        path = Path(path)
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "sandbox", "cluster": {"server": self.url}}],
            "users": [{"name": "sandbox", "user": {"token": "sandbox-no-auth"}}],
            "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox", "namespace": "default"}}],
            "current-context": "sandbox",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    # ---- admission plumbing --------------------------------------------------------------------
    def route_service(self, namespace: str, name: str, port: int, host: str = "127.0.0.1") -> None:
        """Say where the webhook Service `namespace/name` really listens. The double has no Service
        networking, so a clientConfig.service reference is dialled here (its own port is ignored),
        while TLS is still verified for `<name>.<namespace>.svc`."""
        self._routes[(namespace, name)] = (host, port)

    def _resolve(self, namespace: str, name: str) -> tuple[str, int] | None:
        return self._routes.get((namespace, name))

    def _record_admission(self, entry: dict[str, Any]) -> None:
        with self._log_lock:
            self.admission_log.append(entry)

    # ---- fault injection -----------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the watch history (and list snapshots): older resourceVersions now get 410 Expired."""
        self.store.compact()

    def stall_watches(self, on: bool) -> None:
        """While on, open watch streams send nothing (no events, no bookmarks, no end) but stay open.
        Returns once no watch is mid-send, so nothing written after this call reflects later state."""
        with self._gate:
            if on:
                self.stalled.set()
                # bounded: a stream blocked writing to a client that stopped reading never finishes
                self._gate.wait_for(lambda: not self._sending, timeout=5)
            else:
                self.stalled.clear()

    def begin_send(self) -> bool:
        """A watch stream asks to send; False while stalled. Pair a True with end_send()."""
        with self._gate:
            if self.stalled.is_set():
                return False
            self._sending += 1
            return True

    def end_send(self) -> None:
        with self._gate:
            self._sending -= 1
            if not self._sending:
                self._gate.notify_all()

    def forbid(self, rt: ResourceType, verb: str, on: bool = True) -> None:
        """While on, every ``verb`` (create, get, list, watch, update, patch, delete) on ``rt`` is refused with
        403 Forbidden, worded as kube-apiserver's RBAC refusal: a client without that permission."""
        if on:
            self._forbidden.add((rt, verb))
        else:
            self._forbidden.discard((rt, verb))

    def authorize(self, rt: ResourceType, verb: str, namespace: str | None) -> None:
        """Raise the 403 a forbidden request gets (called by the handler before anything else)."""
        if (rt, verb) in self._forbidden:
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            raise ApiError(403, f'{rt.qualified} is forbidden: User "system:anonymous" cannot {verb} resource '
                                f'"{rt.plural}" in API group "{rt.group}"{where}',
                           details={"kind": rt.plural, "group": rt.group})

    @property
    def resource_version(self) -> str:
        return str(self.store.rv)
