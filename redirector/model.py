"""The redirector's vocabulary: what a redirect is, and the interface every kernel backend implements.

Pure data. The desired state (Services -> entries) and the diff (desired vs actual) are pure functions
over these types; backends are the thin imperative shell that reads and writes the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from shared.errors import RedirectorError

Family = Literal[4, 6]
Kind = Literal["clusterIP", "externalIP", "loadBalancer", "nodePort"]


class Key(NamedTuple):
    """What the kernel matches on: TCP to (ip, port). ``ip`` is None for a NodePort (any local address).

    A NamedTuple rather than a dataclass: keys are hashed and compared millions of times (20,000 per full
    sync, several dict operations each), and a tuple does both in C, several times faster.
    """

    family: Family
    ip: str | None
    port: int

    def sort_key(self) -> tuple[int, bool, str, int]:
        """Total order (NodePorts after addresses of the same family): ``ip`` may be None."""
        return (self.family, self.ip is None, self.ip or "", self.port)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return self.sort_key() >= other.sort_key()

    def __str__(self) -> str:
        host = "*local*" if self.ip is None else (f"[{self.ip}]" if self.family == 6 else self.ip)
        return f"{host}:{self.port}"


@dataclass(frozen=True, order=True)
class Owner:
    """The Service port an entry belongs to."""

    namespace: str
    name: str
    port_name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port_name or '-'}"


@dataclass(frozen=True, order=True)
class Entry:
    """One redirect: TCP to ``key`` goes to the local proxy port."""

    key: Key
    kind: Kind
    owner: Owner


@dataclass(frozen=True, order=True)
class UnservedPort:
    """A non-TCP port of a labelled Service: kube-proxy ignores it and we cannot serve it."""

    owner: Owner
    protocol: str
    port: int


@dataclass
class DesiredState:
    """Everything the node should redirect, plus what it cannot serve and per-Service errors."""

    entries: dict[Key, Entry] = field(default_factory=dict)
    unserved: list[UnservedPort] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # "namespace/name" -> message

    def keys(self) -> frozenset[Key]:
        return frozenset(self.entries)


@dataclass(frozen=True)
class Delta:
    """The difference to apply: keys to add and keys to delete."""

    add: frozenset[Key] = frozenset()
    delete: frozenset[Key] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.add or self.delete)


def diff(desired: Iterable[Key], actual: Iterable[Key]) -> Delta:
    """Desired vs actual, as what to add and what to delete."""
    want, have = frozenset(desired), frozenset(actual)
    return Delta(add=want - have, delete=have - want)


class Gate(Protocol):
    """Who says a redirect may enter the kernel: the control plane, once the local Envoy serves the key."""

    def servable(self, keys: Iterable[Key]) -> set[Key]:
        """The subset of ``keys`` the proxy serves now."""
        ...


class BackendError(RedirectorError, RuntimeError):
    """A kernel read or write failed. Every backend raises this (or a subclass, e.g. ``IptablesError``) and
    nothing else for a kernel failure; the agent then schedules a full sync."""


class Backend(Protocol):
    """A kernel backend (nftables, iptables, or the in-memory ``FakeBackend`` of the tests): the one contract
    the agent relies on, written down the way knftables documents its ``Transaction``.

    **Transactions.** Every write is all or nothing: nftables sends ONE libnftables batch per call, iptables
    ONE ``*-restore`` batch per IP family touched (IPv4 and IPv6 are separate tables, as for kube-proxy).
    When a write raises ``BackendError`` the failing transaction changed nothing; an earlier transaction of
    the same call (the other family) may have gone through. The agent therefore trusts nothing after a
    failure and runs ``ensure``.

    **Who repairs.** Only ``ensure``. ``apply`` never repairs: when the kernel disagrees with what the
    delta assumes (our table or chain missing, deleting a key someone already deleted, a rejected rule) it
    raises, so the agent counts the failure, and the ``ensure`` that follows counts the drift it repairs,
    the same way for every backend.

    **Reads.** ``read`` and ``ensure`` ask the kernel, never memory; ``apply`` may trust what the backend
    itself last wrote or read (that is what makes it cheap), which is why it must fail rather than guess.
    ``ensure`` reports what it found in ``last_seen``, so a full sync after a failure (which compares the
    kernel with what the agent last applied, to count drift) reads the kernel once, not ``read`` + ``ensure``.

    **Keys.** A backend owns its table or chains and nothing else; other owners' objects are never touched.
    """

    name: str
    # What the kernel held when the last ``ensure`` looked, before it changed anything: our keys, or None
    # when our table/chains were absent or of another shape (or that ``ensure`` raised before it could read).
    # Every ``ensure`` sets it, first to None; the agent reads it right after ``ensure`` returns (one thread).
    last_seen: frozenset[Key] | None

    def ensure(self, keys: Iterable[Key]) -> bool:
        """Make the kernel hold exactly ``keys`` with our table/chains in the expected shape.

        Adopts existing objects without flushing them; replaces an unexpectedly shaped table atomically.
        Returns True when it had to change anything (shape wrong, objects missing, or elements differed,
        a first install included), False when the kernel already held exactly ``keys``. Raises
        ``BackendError`` only when the kernel cannot be read or written.
        """
        ...

    def apply(self, delta: Delta) -> None:
        """Add/delete just these keys, in one transaction (per family, for iptables); no repair.

        Adding a key the kernel holds, or deleting one it does not, may raise (nftables: deleting an
        absent element fails) or be a no-op (iptables, when its memory says so); either way the kernel
        ends up consistent with the delta or unchanged. An empty delta writes nothing.
        """
        ...

    def read(self) -> frozenset[Key]:
        """What the kernel holds now (read back, never from memory); empty when our objects are absent."""
        ...

    def describe(self) -> dict[str, object]:
        """Backend name, table/chain/set names and the rule text, for the debug endpoints."""
        ...

    def cleanup(self) -> None:
        """Remove everything this backend owns and nothing else (nothing to remove is no error)."""
        ...
