"""The namespace cache against the sandbox apiserver: list+watch, 410 re-list, API restarts, a
stalled stream, and the GET fallback."""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Iterator

import pytest
from kubernetes import client

from sandbox.api.apiserver import SandboxApiServer
from shared.kube import is_read_timeout
from tests.support.polling import wait_for
from webhook.namespaces import NamespaceCache

NAME_LABEL = "kubernetes.io/metadata.name"
_ids = itertools.count()


@pytest.fixture
def api() -> Iterator[SandboxApiServer]:
    with SandboxApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def core(api: SandboxApiServer) -> client.CoreV1Api:
    return client.CoreV1Api(api.api_client())


def make_cache(api: SandboxApiServer, **kwargs: float) -> NamespaceCache:
    options = {"watch_timeout": 30, "inactivity_timeout": 5.0, "max_backoff": 0.5, "page_size": 2, **kwargs}
    cache = NamespaceCache(api.api_client(), **options)  # type: ignore[arg-type]
    cache.start()
    return cache


def ns_name() -> str:
    return f"ns-{os.getpid()}-{next(_ids)}"


def sees(cache: NamespaceCache, name: str, labels: dict[str, str] | None) -> bool:
    want = None if labels is None else {**labels, NAME_LABEL: name}
    return cache.labels(name) == want


def test_list_pages_then_watch_adds_modifies_deletes(api: SandboxApiServer, core: client.CoreV1Api) -> None:
    names = [ns_name() for _ in range(5)]
    for name in names:  # more than one page (page_size=2)
        core.create_namespace({"metadata": {"name": name, "labels": {"team": "a"}}})
    cache = make_cache(api)
    try:
        assert cache.wait_synced(10)
        assert all(sees(cache, n, {"team": "a"}) for n in names)
        core.patch_namespace(names[0], {"metadata": {"labels": {"team": "b"}}})
        core.delete_namespace(names[1])
        added = ns_name()
        core.create_namespace({"metadata": {"name": added}})
        wait_for(lambda: sees(cache, names[0], {"team": "b"}) and sees(cache, names[1], None) and sees(cache, added, {}),
                 "watch events to reach the cache")
    finally:
        cache.stop()


def test_expired_resource_version_relists(api: SandboxApiServer, core: client.CoreV1Api) -> None:
    name = ns_name()
    core.create_namespace({"metadata": {"name": name}})
    cache = make_cache(api, inactivity_timeout=1.0)
    try:
        assert cache.wait_synced(10)
        api.stall_watches(True)  # the cache stops hearing anything...
        core.patch_namespace(name, {"metadata": {"labels": {"after": "compaction"}}})
        api.compact()  # ...and the history it would resume from is gone
        wait_for(lambda: cache.restarts >= 1, "the silent stream to be given up")
        api.stall_watches(False)
        wait_for(lambda: cache.relists >= 1, "the 410 on the next watch to trigger a re-list")
        wait_for(lambda: sees(cache, name, {"after": "compaction"}), "the re-list to bring the change")
    finally:
        api.stall_watches(False)
        cache.stop()


def test_recovers_when_the_api_comes_back(api: SandboxApiServer, core: client.CoreV1Api) -> None:
    name = ns_name()
    core.create_namespace({"metadata": {"name": name}})
    cache = make_cache(api)
    try:
        assert cache.wait_synced(10)
        api.stop()
        wait_for(lambda: cache.restarts >= 1, "the watch to notice the API is gone")
        api.start()
        core.patch_namespace(name, {"metadata": {"labels": {"while": "away"}}})
        wait_for(lambda: sees(cache, name, {"while": "away"}), "the cache to catch up after the API came back")
        assert cache.synced
    finally:
        cache.stop()


def test_stalled_stream_is_detected_and_resumed_from_its_resource_version(
    api: SandboxApiServer, core: client.CoreV1Api
) -> None:
    name = ns_name()
    core.create_namespace({"metadata": {"name": name}})
    cache = make_cache(api, inactivity_timeout=1.0)
    try:
        assert cache.wait_synced(10)
        api.stall_watches(True)  # the stream stays open but silent: no events, no bookmarks, no end
        core.patch_namespace(name, {"metadata": {"labels": {"seen": "after-stall"}}})
        wait_for(lambda: cache.restarts >= 1, "the read timeout to give up the silent stream")
        api.stall_watches(False)
        wait_for(lambda: sees(cache, name, {"seen": "after-stall"}), "the new watch to replay the missed change")
        assert cache.relists == 0  # resumed from its resourceVersion, no full list needed
    finally:
        api.stall_watches(False)
        cache.stop()


def test_fetch_fills_a_gap_and_a_missing_namespace_has_no_labels(api: SandboxApiServer, core: client.CoreV1Api) -> None:
    cache = NamespaceCache(api.api_client())  # not started: nothing cached
    name = ns_name()
    core.create_namespace({"metadata": {"name": name, "labels": {"x": "y"}}})
    assert cache.labels(name) is None and not cache.synced
    assert cache.fetch(name) == {"x": "y", NAME_LABEL: name}
    assert cache.labels(name) == {"x": "y", NAME_LABEL: name}
    assert cache.fetch("does-not-exist") == {}


def test_fetch_against_a_hung_api_is_one_try_within_its_timeout() -> None:
    """Issue 17 item 2: against a listener that accepts and never answers, urllib3's default retries made
    the GET fallback 4 tries x 2 s = 8 s, past the webhook's timeoutSeconds (3). Now: one connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
        cache = NamespaceCache(client.ApiClient(configuration), lookup_timeout=0.3)
        with pytest.raises(Exception) as raised:
            cache.fetch("new-namespace")
        assert is_read_timeout(raised.value) or "timed out" in str(raised.value).lower(), repr(raised.value)
        listener.setblocking(False)
        connections = []
        while True:  # every connection the client made is in the accept queue by now
            try:
                connections.append(listener.accept()[0])
            except BlockingIOError:
                break
        for conn in connections:
            conn.close()
    assert len(connections) == 1, f"{len(connections)} connections: the lookup was retried"
