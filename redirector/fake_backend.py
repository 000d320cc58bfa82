"""An in-memory kernel: the ``Backend`` contract (``redirector.model.Backend``) without netfilter, for tests.

WHY it lives in the package: it is the executable form of the contract, so the agent's batching, retry,
drift and resync logic can be tested without root in milliseconds (tests/redirector/test_agent_logic.py);
the netns tests stay for the real backends and the data path. It behaves like the nftables backend: one
transaction per call, all or nothing; ``apply`` without our table, or deleting an absent key, fails and
repairs nothing; ``ensure`` repairs and says whether it had to.

Test hooks: ``fail`` (inject failures into the next calls of an operation), ``tamper``/``drop_table``
(someone else changes the kernel), ``dump`` (the kernel's keys, sorted) and ``calls`` (what was asked).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable

from redirector.model import BackendError, Delta, Key

OPERATIONS = ("ensure", "apply", "read", "cleanup")


class FakeBackend:
    """The ``Backend`` contract in memory. Thread-safe (one lock, like ``NftBackend``)."""

    name = "fake"

    def __init__(self, keys: Iterable[Key] | None = None) -> None:
        """``keys``: what the "kernel" already holds (our table exists); None = no table yet."""
        self._kernel: set[Key] | None = None if keys is None else set(keys)
        self._failures: dict[str, list[str]] = {op: [] for op in OPERATIONS}
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.transactions = 0  # writes that went through

    # -- test hooks ----------------------------------------------------------------------------------

    def fail(self, operation: str, times: int = 1, message: str = "injected failure") -> None:
        """The next ``times`` calls of ``operation`` raise ``BackendError(message)`` and change nothing."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, not {operation!r}")
        with self._lock:
            self._failures[operation].extend([message] * times)

    def tamper(self, *, add: Iterable[Key] = (), delete: Iterable[Key] = ()) -> None:
        """Someone else edits our table (a hand edit, another tool): drift."""
        with self._lock:
            if self._kernel is None:
                self._kernel = set()
            self._kernel |= set(add)
            self._kernel -= set(delete)

    def drop_table(self) -> None:
        """Someone deletes our table."""
        with self._lock:
            self._kernel = None

    def dump(self) -> list[Key]:
        """What the kernel holds, sorted (the order ``Key`` defines); empty without a table."""
        with self._lock:
            return sorted(self._kernel or ())

    @property
    def has_table(self) -> bool:
        with self._lock:
            return self._kernel is not None

    # -- Backend -------------------------------------------------------------------------------------

    last_seen: frozenset[Key] | None = None  # what the last ``ensure`` found (None: no table)

    def ensure(self, keys: Iterable[Key]) -> bool:
        want = set(keys)
        with self._lock:
            self.last_seen = None
            self._enter("ensure")
            self.last_seen = frozenset(self._kernel) if self._kernel is not None else None
            if self._kernel == want:
                return False
            self._kernel = want
            self.transactions += 1
            return True

    def apply(self, delta: Delta) -> None:
        with self._lock:
            self._enter("apply")
            if not delta:
                return
            if self._kernel is None:
                raise BackendError("fake: table missing")
            absent = delta.delete - self._kernel
            if absent:
                raise BackendError(f"fake: cannot delete {len(absent)} absent keys, e.g. {min(absent)}")
            self._kernel = (self._kernel - delta.delete) | delta.add
            self.transactions += 1

    def read(self) -> frozenset[Key]:
        with self._lock:
            self._enter("read")
            return frozenset(self._kernel or ())

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {"backend": self.name, "table": None if self._kernel is None else "fake",
                    "entries": [str(k) for k in sorted(self._kernel or ())]}

    def cleanup(self) -> None:
        with self._lock:
            self._enter("cleanup")
            self._kernel = None

    def _enter(self, operation: str) -> None:
        """Count the call; raise the next injected failure of ``operation`` (before anything changes)."""
        self.calls[operation] += 1
        pending = self._failures[operation]
        if pending:
            raise BackendError(f"fake {operation}: {pending.pop(0)}")
