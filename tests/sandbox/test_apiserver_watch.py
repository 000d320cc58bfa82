"""Watch semantics of SandboxApiServer, through kubernetes.watch.Watch and through raw HTTP streams."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import watch
from kubernetes.client import ApiException, CoreV1Api

from sandbox.api.apiserver import SandboxApiServer
from tests.support.polling import wait_for


@pytest.fixture
def server() -> Iterator[SandboxApiServer]:
    with SandboxApiServer(bookmark_interval=0.2) as srv:
        yield srv


@pytest.fixture
def core(server: SandboxApiServer) -> CoreV1Api:
    api = CoreV1Api(server.api_client())
    api.create_namespace({"metadata": {"name": "demo"}})
    return api


def svc(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"ports": [{"port": 80}]}}


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in events if e["type"] != "BOOKMARK"]


class RawWatch:
    """A watch read straight off a socket, to see exactly what the server sends (or does not).
    A read timeout here leaves the stream usable, unlike http.client's."""

    def __init__(self, server: SandboxApiServer, path: str) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: sandbox\r\nAccept: application/json\r\n\r\n".encode())
        self.raw = b""
        self.body = b""
        self.ended = False
        while b"\r\n\r\n" not in self.raw:
            self._recv(10)
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        self.status = int(head.split()[1])
        assert self.status == 200, head
        self.headers = head.decode().lower()

    def _recv(self, timeout: float) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.raw += data

    def _dechunk(self) -> None:
        while b"\r\n" in self.raw:
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:
                self.ended = True
                return
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.raw = rest[size + 2:]

    def next(self, timeout: float = 10) -> dict[str, Any] | None:
        """The next event; None when the server ended the stream; TimeoutError when it is silent."""
        while True:
            self._dechunk()
            if b"\n" in self.body:
                line, self.body = self.body.split(b"\n", 1)
                return dict(json.loads(line))
            if self.ended:
                return None
            try:
                self._recv(timeout)
            except EOFError:
                return None

    def next_non_bookmark(self) -> dict[str, Any] | None:
        while True:
            ev = self.next()
            if ev is None or ev["type"] != "BOOKMARK":
                return ev

    def close(self) -> None:
        self.sock.close()


def test_replay_from_resource_version_then_live(core: CoreV1Api) -> None:
    start = core.list_namespaced_service("demo").metadata.resource_version
    core.create_namespaced_service("demo", svc("a"))
    core.create_namespaced_service("demo", svc("b"))
    core.patch_namespaced_service("a", "demo", {"metadata": {"labels": {"x": "1"}}})
    core.delete_namespaced_service("b", "demo")
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_service, "demo", resource_version=start, timeout_seconds=30)
    seen = [next(stream) for _ in range(4)]
    assert summary(seen) == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    rvs = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in seen]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4
    core.create_namespaced_service("demo", svc("c"))  # live, after the replay
    assert summary([next(stream)]) == [("ADDED", "c")]
    w.stop()


def test_empty_or_zero_resource_version_sends_current_state_first(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("a"))
    core.patch_namespaced_service("a", "demo", {"metadata": {"labels": {"x": "1"}}})
    core.create_namespaced_service("demo", svc("b"))
    expected = [("ADDED", "a"), ("ADDED", "b")]
    for rv, live in (("0", "live-zero"), (None, "live-unset")):
        w = watch.Watch()
        kwargs = {"resource_version": rv} if rv is not None else {}
        stream = w.stream(core.list_namespaced_service, "demo", timeout_seconds=30, **kwargs)
        assert summary([next(stream) for _ in expected]) == expected
        core.create_namespaced_service("demo", svc(live))
        assert summary([next(stream)]) == [("ADDED", live)]
        expected.append(("ADDED", live))
        w.stop()


def test_bookmarks_carry_the_current_resource_version(core: CoreV1Api) -> None:
    start = core.list_namespaced_service("demo").metadata.resource_version
    core.create_namespace({"metadata": {"name": "elsewhere"}})  # bumps the rv, invisible to this watch
    current = core.read_namespace("elsewhere").metadata.resource_version
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_service, "demo", resource_version=start,
                          allow_watch_bookmarks=True, timeout_seconds=30):
        assert event["type"] == "BOOKMARK"
        assert event["raw_object"]["metadata"]["resourceVersion"] == current
        assert w.resource_version == current
        break
    w.stop()


def test_selector_transitions_become_deleted_and_added(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("a", {"tier": "web"}))
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_service, "demo", label_selector="tier=web", timeout_seconds=30)
    assert summary([next(stream)]) == [("ADDED", "a")]
    moved = core.patch_namespaced_service("a", "demo", {"metadata": {"labels": {"tier": "db"}}})
    left = next(stream)
    # As kube-apiserver's watch cache does: the last state the watch matched, at the event's resourceVersion.
    assert summary([left]) == [("DELETED", "a")] and left["raw_object"]["metadata"]["labels"]["tier"] == "web"
    assert left["raw_object"]["metadata"]["resourceVersion"] == moved.metadata.resource_version
    core.create_namespaced_service("demo", svc("ignored", {"tier": "db"}))
    core.patch_namespaced_service("a", "demo", {"metadata": {"labels": {"tier": "web"}}})
    assert summary([next(stream)]) == [("ADDED", "a")]
    core.patch_namespaced_service("a", "demo", {"metadata": {"labels": {"more": "x"}}})
    assert summary([next(stream)]) == [("MODIFIED", "a")]
    w.stop()


def test_watch_scopes_namespace_and_field_selector(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    w = watch.Watch()
    stream = w.stream(core.list_service_for_all_namespaces, field_selector="metadata.name=want", timeout_seconds=30)
    core.create_namespaced_service("demo", svc("skip"))
    core.create_namespaced_service("other", svc("want"))
    event = next(stream)
    assert summary([event]) == [("ADDED", "want")] and event["object"].metadata.namespace == "other"
    w.stop()


def test_too_old_resource_version_is_410_expired(server: SandboxApiServer, core: CoreV1Api) -> None:
    old = core.list_namespaced_service("demo").metadata.resource_version
    core.create_namespaced_service("demo", svc("a"))
    server.compact()
    raw = RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={old}")
    event = raw.next()
    assert event is not None and event["type"] == "ERROR"
    status = event["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith(f"too old resource version: {old} (")
    assert raw.next() is None  # and the stream ends
    raw.close()
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(core.list_namespaced_service, "demo", resource_version=old, timeout_seconds=5):
            pass
    assert exc.value.status == 410
    # the current resourceVersion is still fine
    now = core.list_namespaced_service("demo").metadata.resource_version
    raw = RawWatch(server, f"/api/v1/namespaces/demo/services?watch=1&resourceVersion={now}&timeoutSeconds=1")
    assert raw.next() is None
    raw.close()


def test_history_limit_expires_old_versions() -> None:
    with SandboxApiServer(history_limit=3) as srv:
        api = CoreV1Api(srv.api_client())
        api.create_namespace({"metadata": {"name": "demo"}})
        first = srv.resource_version
        for i in range(5):
            api.create_namespaced_service("demo", svc(f"s{i}"))
        raw = RawWatch(srv, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={first}")
        event = raw.next()
        assert event is not None and event["object"]["code"] == 410
        raw.close()


def test_timeout_seconds_ends_the_stream(core: CoreV1Api) -> None:
    core.create_namespaced_service("demo", svc("a"))
    events = list(watch.Watch().stream(core.list_namespaced_service, "demo", timeout_seconds=1))
    assert summary(events) == [("ADDED", "a")]  # the generator finished: the server closed the stream


def test_stalled_watch_sends_nothing_but_stays_open(server: SandboxApiServer, core: CoreV1Api) -> None:
    rv = core.list_namespaced_service("demo").metadata.resource_version
    raw = RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true")
    first = raw.next()
    assert first is not None and first["type"] == "BOOKMARK"
    server.stall_watches(True)  # returns once no stream is mid-send
    created = core.create_namespaced_service("demo", svc("during-stall"))
    late: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):  # silence, and no end of stream either
        while True:
            event = raw.next(timeout=1)
            assert event is not None, "a stalled watch must not be closed"
            late.append(event)
    # whatever arrived was written before the stall: bookmarks that predate the new object
    assert all(e["type"] == "BOOKMARK" for e in late)
    assert all(int(e["object"]["metadata"]["resourceVersion"]) < int(created.metadata.resource_version) for e in late)
    server.stall_watches(False)
    event = raw.next_non_bookmark()
    assert event is not None and (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "during-stall")
    raw.close()


def test_stall_then_resume_delivers_held_events(server: SandboxApiServer, core: CoreV1Api) -> None:
    rv = core.list_namespaced_service("demo").metadata.resource_version
    raw = RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={rv}")
    server.stall_watches(True)
    core.create_namespaced_service("demo", svc("held"))
    with pytest.raises(TimeoutError):
        raw.next(timeout=1)
    server.stall_watches(False)
    event = raw.next_non_bookmark()
    assert event is not None and (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "held")
    raw.close()


def test_stop_closes_open_watches_and_restart_serves_again(server: SandboxApiServer, core: CoreV1Api) -> None:
    rv = core.list_namespaced_service("demo").metadata.resource_version
    raws = [RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={rv}") for _ in range(3)]
    server.stop()
    for raw in raws:
        with contextlib.suppress(ConnectionError):  # cut mid-stream: also what a dead API server looks like
            assert raw.next(timeout=10) is None
        raw.close()
    server.start()
    core.create_namespaced_service("demo", svc("after"))
    events = list(watch.Watch().stream(core.list_namespaced_service, "demo", resource_version=rv, timeout_seconds=1))
    assert summary(events) == [("ADDED", "after")]


def test_many_concurrent_watches_all_see_the_event(server: SandboxApiServer, core: CoreV1Api) -> None:
    rv = core.list_namespaced_service("demo").metadata.resource_version
    raws = [RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={rv}") for _ in range(60)]
    core.create_namespaced_service("demo", svc("fanout"))
    for raw in raws:
        event = raw.next_non_bookmark()
        assert event is not None and event["object"]["metadata"]["name"] == "fanout"
        raw.close()


def test_bad_watch_resource_version_is_400(server: SandboxApiServer, core: CoreV1Api) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/api/v1/namespaces/demo/services?watch=true&resourceVersion=abc")
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["kind"] == "Status"
    conn.close()
    with socket.create_connection((server.host, server.port)):
        pass


def test_abandoned_watch_streams_are_reaped(server: SandboxApiServer, core: CoreV1Api) -> None:
    rv = core.list_namespaced_service("demo").metadata.resource_version
    raw = RawWatch(server, f"/api/v1/namespaces/demo/services?watch=true&resourceVersion={rv}")
    wait_for(lambda: server.store.watchers, "the watch to be registered")
    assert len(server.store.watchers) == 1
    raw.close()  # no bookmarks, no events: the server must notice the hang-up by itself
    wait_for(lambda: not server.store.watchers, "the abandoned stream to be reaped")
