"""core/v1 Events on a Service, written the way client-go's recorder writes them (pure builders).

One builder for every component that tells the operator about a handover: the CLI (``cli.events``) and
the webhook's handover controller (``webhook.handover``). ``kubectl describe service`` lists them by
involvedObject. Messages are bounded (Kubernetes caps an Event's message at 1 KiB) and node lists are cut
("a, b, c and 4 more") whatever the cluster's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from shared import constants as c

SHOWN_NODES = 5  # nodes named in a message; the rest are counted ("and 7 more")


def node_list(nodes: Sequence[str], shown: int = SHOWN_NODES) -> str:
    """``a, b, c and 4 more`` (pure): a bounded list however many nodes there are."""
    head = ", ".join(nodes[:shown])
    return head + (f" and {len(nodes) - shown} more" if len(nodes) > shown else "")


def bounded(message: str, limit: int = c.EVENT_MESSAGE_MAX_BYTES) -> str:
    """At most ``limit`` bytes of UTF-8, cut on a character boundary and marked with an ellipsis (pure)."""
    data = message.encode()
    if len(data) <= limit:
        return message
    return data[: limit - len("…".encode())].decode(errors="ignore") + "…"


def event_body(namespace: str, name: str, uid: str | None, reason: str, type_: str, message: str, *, action: str,
               now: datetime, component: str, instance: str) -> dict[str, Any]:
    """The core/v1 Event (pure). Named ``<service>.<hex nanoseconds>`` as client-go's recorder names them."""
    stamp = now.astimezone(UTC)
    nanos = int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000
    when = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "namespace": namespace, "name": name}
    if uid:
        involved["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{nanos:x}", "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": bounded(message),
        "type": type_,
        "action": action,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": instance[:128],
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
    }
