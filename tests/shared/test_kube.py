"""shared.kube's pure parts: the line splitter and the read-timeout test (the Reflector itself is exercised
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
