"""shared.kube's pure parts: the line splitter and the read-timeout test (the Reflector is also exercised
against the sandbox API server by tests/redirector/test_watch.py and tests/webhook/test_namespaces.py)."""

from __future__ import annotations

import urllib3
from kubernetes.client.exceptions import ApiException

from shared.kube import is_read_timeout, split_lines


def test_lines_split_across_chunks_and_blank_lines_dropped() -> None:
    chunks = [b'{"a":1}\n{"b"', b':2}\n\n  \n{"c":', b"3}"]
    assert list(split_lines(chunks)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_one_huge_chunk_of_many_lines_is_split_exactly() -> None:
    lines = [f'{{"n":{i}}}'.encode() for i in range(100_000)]  # ~1 MiB in one chunk
    assert list(split_lines([b"\n".join(lines) + b"\n"])) == lines


def test_a_chunk_per_byte_still_yields_whole_lines() -> None:
    data = b'{"x":"y"}\n{"z":1}\n'
    assert list(split_lines(bytes([b]) for b in data)) == [b'{"x":"y"}', b'{"z":1}']


def test_read_timeouts_are_recognised_by_type_not_text() -> None:
    assert is_read_timeout(urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out."))
    assert is_read_timeout(TimeoutError("timed out"))
    assert is_read_timeout(urllib3.exceptions.ProtocolError("Connection broken", TimeoutError("timed out")))
    wrapped = RuntimeError("watch failed")
    wrapped.__cause__ = urllib3.exceptions.ReadTimeoutError(None, "/", "x")
    assert is_read_timeout(wrapped)
    # The words alone mean nothing: an API error whose message says so is not a timeout.
    assert not is_read_timeout(ApiException(status=500, reason="Read timed out (from a proxy)"))
    assert not is_read_timeout(ConnectionRefusedError())
    assert not is_read_timeout(None)


def test_a_stalled_watch_resumes_after_the_last_event_it_saw() -> None:
    """A stream that goes silent is given up client-side; the next watch starts at the resourceVersion of
    the last event seen (not where the failed watch began, which would replay or, after a compaction, force
    a needless re-list), and changes made during the stall arrive once the server talks again."""
    import threading
    from typing import Any

    from kubernetes import client

    from sandbox.api.apiserver import SandboxApiServer
    from sandbox.node.traffic import wait_until
    from shared.kube import Reflector

    class Sink:
        def __init__(self) -> None:
            self.names: list[str] = []
            self.reasons: list[str] = []

        def replace(self, items: Any) -> None:
            self.names = [o["metadata"]["name"] for o in items]

        def upsert(self, obj: dict[str, Any]) -> None:
            self.names.append(obj["metadata"]["name"])

        def delete(self, obj: dict[str, Any]) -> None:
            self.names.remove(obj["metadata"]["name"])

        def restarted(self, reason: str) -> None:
            self.reasons.append(reason)

    with SandboxApiServer() as api:
        core = client.CoreV1Api(api.api_client())
        core.create_namespace({"metadata": {"name": "demo"}})
        watches: list[str | None] = []

        def list_fn(**kw: Any) -> Any:
            if kw.get("watch"):
                watches.append(kw.get("resource_version"))
            return core.list_service_for_all_namespaces(**kw)

        sink = Sink()
        reflector = Reflector(list_fn, sink, what="services", server_timeout=60, read_timeout=0.5,
                              backoff_base=0.05, backoff_max=0.1)
        thread = threading.Thread(target=reflector.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: reflector.connected, timeout=10, what="watching")
            listed_at = watches[0]
            core.create_namespaced_service("demo", {"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}})
            wait_until(lambda: "a" in sink.names, timeout=10, what="event a")
            seen = reflector.resource_version
            api.stall_watches(True)
            try:
                wait_until(lambda: "stalled" in sink.reasons and len(watches) >= 2, timeout=10, what="a re-watch")
                core.create_namespaced_service("demo", {"metadata": {"name": "b"}, "spec": {"ports": [{"port": 80}]}})
            finally:
                api.stall_watches(False)
            wait_until(lambda: "b" in sink.names, timeout=10, what="event b after the stall")
        finally:
            reflector.stop()
            thread.join(5)
        assert watches[1] == seen != listed_at
        assert reflector.lists == 1 and sink.names == ["a", "b"]
