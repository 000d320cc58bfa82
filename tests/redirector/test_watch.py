"""The watcher against the sandbox API server (real HTTP, the real kubernetes client), feeding the agent's
real ChangeTracker. No kernel here: what matters is what the tracker ends up knowing."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from redirector.agent import ChangeTracker
from redirector.desired import DesiredIndex
from redirector.watch import ServiceWatcher
from sandbox.api.apiserver import SandboxApiServer
from sandbox.api.resources import NAMESPACES, SERVICES
from sandbox.node.traffic import wait_until
from shared import constants as c
from shared.kubeapi import Api

LABELS = {c.SERVICE_PROXY_NAME_LABEL: c.DEFAULT_PROXY_NAME}


class View:
    """The tracker's changes folded into a desired-state index the way the agent's sync loop folds them."""

    def __init__(self) -> None:
        self.tracker = ChangeTracker((c.SERVICE_PROXY_NAME_LABEL, c.DEFAULT_PROXY_NAME))
        self.index = DesiredIndex()
        self.restarts: list[str] = []

    def services(self) -> set[str]:
        self.restarts += self.tracker.drain_into(self.index).restarts
        return set(self.index.service_ids())

    def restarted(self, reason: str) -> bool:
        """Whether the watcher has reported a restart for ``reason`` (drains the tracker, as a sync does)."""
        self.services()
        return reason in self.restarts


@pytest.fixture
def api() -> Iterator[SandboxApiServer]:
    with SandboxApiServer(bookmark_interval=0.1) as server:
        server.operations.create(NAMESPACES, None, {"metadata": {"name": "shop"}})
        yield server


def create(server: SandboxApiServer, name: str, *, labelled: bool = True, **spec: Any) -> None:
    body = {"metadata": {"name": name, "labels": dict(LABELS) if labelled else {}},
            "spec": {"ports": [{"name": "http", "port": 80}], **spec}}
    server.operations.create(SERVICES, "shop", body)


def patch_labels(server: SandboxApiServer, name: str, labels: dict[str, Any]) -> None:
    core = client.CoreV1Api(server.api_client())
    core.patch_namespaced_service(name, "shop", {"metadata": {"labels": labels}})


@pytest.fixture
def watching(api: SandboxApiServer) -> Iterator[tuple[ServiceWatcher, View]]:
    view = View()
    watcher = ServiceWatcher(Api(api.api_client()), view.tracker, server_timeout=5, read_timeout=1.0,
                             page_size=2, backoff_base=0.05, backoff_max=0.2)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    yield watcher, view
    watcher.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_list_then_watch_keeps_the_labelled_services(api: SandboxApiServer) -> None:
    for name in ("a", "b", "c"):
        create(api, name)
    create(api, "plain", labelled=False)
    view = View()
    watcher = ServiceWatcher(Api(api.api_client()), view.tracker, read_timeout=1.0, page_size=2)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: view.services() == {"shop/a", "shop/b", "shop/c"}, what="paged list")
        assert view.tracker.listed.is_set()
        create(api, "d")
        wait_until(lambda: "shop/d" in view.services(), what="ADDED")
        patch_labels(api, "a", {c.SERVICE_PROXY_NAME_LABEL: None})  # label removed: MODIFIED, the tracker lets it go
        wait_until(lambda: "shop/a" not in view.services(), what="label removal")
        patch_labels(api, "plain", LABELS)  # label added: ADDED
        wait_until(lambda: "shop/plain" in view.services(), what="label added")
        client.CoreV1Api(api.api_client()).delete_namespaced_service("b", "shop")
        wait_until(lambda: view.services() == {"shop/c", "shop/d", "shop/plain"}, what="DELETED")
    finally:
        watcher.stop()
        thread.join(timeout=5)


def test_bookmarks_advance_the_resource_version(api: SandboxApiServer, watching: Any) -> None:
    watcher, view = watching
    wait_until(lambda: view.tracker.listed.is_set())
    start = int(watcher.resource_version)
    for i in range(3):
        # Namespaces move the server's resourceVersion, with no Service event for us: only bookmarks tell.
        api.operations.create(NAMESPACES, None, {"metadata": {"name": f"other-{i}"}})
    wait_until(lambda: int(watcher.resource_version) >= start + 3, what="bookmark")
    assert view.services() == set()


def test_410_gone_leads_to_a_relist(api: SandboxApiServer, watching: Any) -> None:
    watcher, view = watching
    create(api, "old")
    wait_until(lambda: view.services() == {"shop/old"})
    api.stop()
    create(api, "new")  # written while our watch is down...
    api.operations.delete(SERVICES, "shop", "old", None)
    api.compact()  # ...and the history that would replay them is gone
    api.start()
    wait_until(lambda: view.services() == {"shop/new"}, timeout=10, what="re-list after 410")
    assert "gone" in view.restarts
    assert watcher.lists >= 2


def test_a_stalled_watch_is_detected_and_restarted(api: SandboxApiServer, watching: Any) -> None:
    watcher, view = watching
    wait_until(lambda: view.tracker.listed.is_set())
    api.stall_watches(True)
    create(api, "during-stall")
    wait_until(lambda: view.restarted("stalled"), timeout=10, what="stall detected")
    api.stall_watches(False)
    wait_until(lambda: "shop/during-stall" in view.services(), timeout=10, what="caught up after the stall")


def test_api_server_down_and_back(api: SandboxApiServer, watching: Any) -> None:
    watcher, view = watching
    create(api, "before")
    wait_until(lambda: view.services() == {"shop/before"})
    api.stop()
    wait_until(lambda: view.restarted("error"), timeout=10, what="errors seen")
    create(api, "while-down")
    api.start()
    wait_until(lambda: view.services() == {"shop/before", "shop/while-down"}, timeout=15, what="converged")


def test_server_timeout_ends_the_watch_and_it_resumes(api: SandboxApiServer) -> None:
    view = View()
    watcher = ServiceWatcher(Api(api.api_client()), view.tracker, server_timeout=1, read_timeout=2.0)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: view.restarted("expired"), timeout=10)
        create(api, "after")
        wait_until(lambda: "shop/after" in view.services())
        assert watcher.lists == 1  # resumed from its resourceVersion, no re-list
    finally:
        watcher.stop()
        thread.join(timeout=5)


def test_unknown_event_types_and_garbage_are_skipped() -> None:
    view = View()
    watcher = ServiceWatcher(Api(client.ApiClient()), view.tracker)
    obj = {"metadata": {"name": "x", "namespace": "shop", "resourceVersion": "42", "labels": LABELS}, "spec": {}}
    assert watcher._handle(json.dumps({"type": "WEIRD", "object": obj}), "41") == "42"
    assert watcher._handle("not json", "42") == "42"
    assert watcher._handle(json.dumps({"type": "ADDED"}), "42") == "42"
    assert view.services() == set()
    assert watcher._handle(json.dumps({"type": "ADDED", "object": obj}), "42") == "42"
    assert view.services() == {"shop/x"}


class _EndsWatchesAtOnce(http.server.BaseHTTPRequestHandler):
    """An API server (or a proxy before it) that lists nothing and ends every watch at once, empty."""

    watches: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if "watch=true" in self.path:
            type(self).watches.append(self.path)
            body = b""
        else:
            body = json.dumps({"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                               "items": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_watch_that_ends_at_once_is_backed_off_not_reopened_in_a_loop() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndsWatchesAtOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    view = View()
    # A backoff of an hour: after the first empty watch the watcher must be waiting, not watching again.
    watcher = ServiceWatcher(Api(client.ApiClient(configuration)), view.tracker,
                             backoff_base=3600, backoff_max=3600)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: view.restarted("error"), what="the empty watch seen")
        assert len(_EndsWatchesAtOnce.watches) == 1
        assert "resourceVersion=7" in _EndsWatchesAtOnce.watches[0]
    finally:
        watcher.stop()
        thread.join(timeout=5)
        server.shutdown()
        server.server_close()
    assert not thread.is_alive()
