"""Store: versions by content, exactly the changed names, listeners told outside the lock."""

from __future__ import annotations

import threading

from controlplane.resources import CLUSTER, ENDPOINT, version_of
from controlplane.store import Store


def test_update_returns_only_the_names_whose_version_changed() -> None:
    store = Store()
    assert store.update(CLUSTER, {"a": b"1", "b": b"2"}) == {"a", "b"}
    assert store.revision == 1
    assert store.update(CLUSTER, {"a": b"1", "b": b"3"}) == {"b"}
    assert store.revision == 2
    assert store.update(CLUSTER, {"a": b"1"}) == frozenset()
    assert store.update(CLUSTER, removes=["nope"]) == frozenset()
    assert store.revision == 2  # nothing changed: no bump
    assert store.update(CLUSTER, {"c": b"4"}, removes=["a"]) == {"a", "c"}
    assert store.revision == 3
    assert sorted(store.names(CLUSTER)) == ["b", "c"] and store.count(CLUSTER) == 2
    assert store.get(CLUSTER, "a") is None


def test_resources_carry_their_type_bytes_and_content_version() -> None:
    store = Store()
    store.update(ENDPOINT, {"x": b"payload"})
    found = store.get(ENDPOINT, "x")
    assert found is not None
    assert (found.name, found.version, found.data) == ("x", version_of(b"payload"), b"payload")
    assert store.names(CLUSTER) == []  # types are separate


def test_listeners_hear_the_changed_names_outside_the_lock() -> None:
    store = Store()
    heard: list[tuple[str, frozenset[str], bool]] = []

    def listener(type_url: str, names: frozenset[str]) -> None:
        free: list[bool] = []

        def probe() -> None:  # another thread can take the lock only if the updater does not hold it
            got = store.lock.acquire(timeout=2)
            free.append(got)
            if got:
                store.lock.release()

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        heard.append((type_url, names, free[0]))

    store.subscribe(listener)
    store.update(CLUSTER, {"a": b"1", "b": b"2"})
    store.update(CLUSTER, {"a": b"1"})  # no change: not told
    store.update(CLUSTER, removes=["b"])
    assert heard == [(CLUSTER, frozenset({"a", "b"}), True), (CLUSTER, frozenset({"b"}), True)]
    store.unsubscribe(listener)
    store.unsubscribe(listener)  # twice is harmless
    store.update(CLUSTER, {"a": b"9"})
    assert len(heard) == 2
