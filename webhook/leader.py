"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it.

WHY: the webhook runs two replicas, and the handover controller in it must act from one of them at a time
(two would race to label and abort the same Service). The holder renews ``spec.renewTime`` every
``renew`` seconds; another replica takes the Lease over only when it has not been renewed for
``duration`` seconds. Every write is a replace with the resourceVersion read (optimistic concurrency): of
two replicas trying at once, the API server lets exactly one win (409 for the other). A leader that cannot
renew within ``duration - renew`` stops leading BEFORE another may take over, so two never lead at once
(clocks aside: client-go's assumption too -- renewTime is compared with the local clock).

``decide`` is pure (what to write, given the Lease read and the time); ``LeaderElector`` is the shell.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from shared.kubeapi import LEASES, Api

log = logging.getLogger(__name__)
# Seconds per Lease call: a hung API server costs one round, never a stuck elector (leading still ends
# ``duration - renew`` after the last successful renewal).
REQUEST_TIMEOUT = 5.0


def _parse(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decide(spec: dict[str, Any] | None, identity: str, now: datetime, duration: int) -> dict[str, Any] | None:
    """The Lease spec to write to hold (or take) the lease, or None when another holder's is still valid.

    ``spec`` None: there is no Lease yet. Pure."""
    spec = spec or {}
    holder = spec.get("holderIdentity")
    renewed = _parse(spec.get("renewTime"))
    seconds = spec.get("leaseDurationSeconds")
    valid_for = seconds if isinstance(seconds, int) and seconds > 0 else duration
    if holder and holder != identity and renewed is not None and now - renewed < timedelta(seconds=valid_for):
        return None
    ours = holder == identity
    count = spec.get("leaseTransitions")
    transitions = count if isinstance(count, int) else 0
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": duration,
        "acquireTime": spec.get("acquireTime") if ours and spec.get("acquireTime") else _stamp(now),
        "renewTime": _stamp(now),
        "leaseTransitions": transitions if ours else transitions + (1 if holder else 0),
    }


class LeaderElector:
    """Keeps trying to hold Lease ``namespace/name`` as ``identity``; ``leading`` says whether it does."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, *, duration: int = 15,
                 renew: float = 5.0, retry: float = 2.0, on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if not 0 < renew < duration:
            raise ValueError("need 0 < renew < duration")
        self.api = Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration, self.renew, self.retry = duration, renew, retry
        self.on_change = on_change
        self.clock = clock
        self._leading_until = 0.0  # monotonic: lead only until then unless renewed
        self._stop = threading.Event()
        self.last_error: str | None = None

    @property
    def leading(self) -> bool:
        return time.monotonic() < self._leading_until

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        was = False
        while not self._stop.is_set():
            if self.try_once():
                # Stop leading early enough that no other replica can have taken over meanwhile.
                self._leading_until = time.monotonic() + self.duration - self.renew
            now = self.leading
            if now != was:
                log.info("leader election", extra={"lease": f"{self.namespace}/{self.name}", "leading": now,
                                                   "identity": self.identity})
                if self.on_change is not None:
                    self.on_change(now)
                was = now
            self._stop.wait(self.renew if now else self.retry)
        if was and self.on_change is not None:
            self.on_change(False)

    def try_once(self) -> bool:
        """One read-decide-write round; True when we hold the Lease afterwards."""
        try:
            try:
                lease: dict[str, Any] | None = self.api.get(LEASES, self.namespace, self.name, timeout=REQUEST_TIMEOUT)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                lease = None
            spec: dict[str, Any] | None = None if lease is None else (lease.get("spec") or {})
            wanted = decide(spec, self.identity, self.clock(), self.duration)
            if wanted is None:
                return False
            metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
            body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                         "spec": wanted}
            if lease is None:
                self.api.create(LEASES, self.namespace, body, timeout=REQUEST_TIMEOUT)
            else:
                metadata["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
                self.api.replace(LEASES, self.namespace, self.name, body, timeout=REQUEST_TIMEOUT)
            self.last_error = None
            return True
        except ApiException as exc:
            if exc.status != 409:  # 409: another replica wrote first -- it won this round
                self.last_error = f"{exc.status} {exc.reason}"
                log.warning("leader election: cannot read or write the Lease", extra={"error": self.last_error})
            return False
        except Exception as exc:  # noqa: BLE001 - an unreachable API server: retry, never crash
            self.last_error = str(exc)[:300]
            log.warning("leader election: cannot reach the API server", extra={"error": self.last_error})
            return False
