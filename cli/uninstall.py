"""``lightpath uninstall``: hand every Service back to kube-proxy on every node, then say how to remove the
components (docs/install.md, "Uninstalling"). Never blackholes, in this order:

1. delete lightpath's MutatingWebhookConfiguration(s) (label ``app.kubernetes.io/part-of=lightpath``): no
   Service gets the handoff label any more, whatever is written meanwhile;
2. remove the handoff label (and a pending handover mark) from every Service that carries ours, directly
   (the webhook that would do it on a rollback is gone); kube-proxy picks them up at its next sync;
3. wait until every LIVE agent reports ``lightpath.cloud/redirects: "0"`` in its Lease, written after the
   labels were removed (its resourceVersion moved; agents renew every 5 s): each agent keeps a
   handed-back Service's redirect until kube-proxy's rule for it is visible on its node, so 0 means
   kube-proxy serves everything there;
4. only then is it safe to delete the components (``kubectl delete -k``); the agents remove their rules
   as their DaemonSet goes (redirector/owner.py).
A timeout in 3 names the nodes still holding redirects and changes nothing more (exit 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from cli.kube import Cluster, ClusterError
from shared import constants as c
from shared.agents import live_agents

PART_OF = "app.kubernetes.io/part-of=lightpath"


def handed_off(services: Iterable[Mapping[str, Any]], proxy_name: str) -> list[tuple[str, str]]:
    """(namespace, name) of every Service carrying our handoff label (pure)."""
    out = []
    for s in services:
        meta = s.get("metadata") or {}
        if (meta.get("labels") or {}).get(c.SERVICE_PROXY_NAME_LABEL) == proxy_name:
            out.append((str(meta.get("namespace")), str(meta.get("name"))))
    return sorted(out)


def redirects_left(leases: Iterable[Mapping[str, Any]], now: datetime,
                   baseline: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(node -> why it is not done, node -> its Lease's resourceVersion) for live agents (pure). Done: the
    Lease says ``redirects: "0"`` AND was written again since ``baseline`` (the versions read when the
    labels were removed), so a count written before the hand-back is never taken for its result. An
    expired Lease does not block, as in a migration."""
    leases = list(leases)
    live = live_agents(leases, now)
    left: dict[str, str] = {}
    seen: dict[str, str] = {}
    for lease in leases:
        meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
        node = str(spec.get("holderIdentity") or str(meta.get("name") or "").removeprefix(c.AGENT_LEASE_PREFIX))
        if node not in live:
            continue
        seen[node] = str(meta.get("resourceVersion") or "")
        count = (meta.get("annotations") or {}).get(c.REDIRECTS_ANNOTATION)
        if count != "0":
            left[node] = str(count) if count is not None else "?"
        elif baseline is None or baseline.get(node, seen[node]) == seen[node]:
            left[node] = "not renewed since the hand-back"
    return left, seen


UNLABEL = {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}, "annotations": {c.HANDOVER_ANNOTATION: None}}}


def uninstall(cluster: Cluster, *, proxy_name: str, agent_namespace: str, timeout: float, say: Callable[[str], None],
              sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    """The steps above; 0 when every node handed everything back, 1 otherwise (said why)."""
    hooks = cluster.list_webhook_configurations(PART_OF)
    for hook in hooks:
        name = str((hook.get("metadata") or {}).get("name"))
        cluster.delete_webhook_configuration(name)
        say(f"deleted MutatingWebhookConfiguration {name}: no Service is handed to lightpath any more")
    if not hooks:
        say(f"no MutatingWebhookConfiguration labelled {PART_OF} (already removed)")
    ours = handed_off(cluster.list_services(None), proxy_name)
    failed: list[str] = []
    for namespace, name in ours:
        try:
            cluster.patch_service(namespace, name, UNLABEL)
        except ClusterError as exc:
            failed.append(f"{namespace}/{name}: {exc}")
    say(f"handed back to kube-proxy: {len(ours) - len(failed)} Service(s)")
    if failed:
        for line in failed:
            say(f"error: {line}")
        say("not finished: fix the errors above and run `lightpath uninstall` again")
        return 1
    deadline = time.monotonic() + timeout
    left, baseline = redirects_left(cluster.list_leases(agent_namespace), clock())
    while left and time.monotonic() < deadline:
        sleep(0.2)
        left, seen = redirects_left(cluster.list_leases(agent_namespace), clock(), baseline)
        baseline = {**seen, **baseline}  # an agent that appeared meanwhile: from its first version on
    if left:
        nodes = ", ".join(f"{n} ({count})" for n, count in sorted(left.items()))
        say(f"not finished: these nodes still hold redirects after {timeout:g}s: {nodes}. "
            "kube-proxy has not taken over there yet (or the agent does not report): do not delete the "
            "components; check the node's `lightpath-redirector debug proxy` and run `lightpath uninstall` again")
        return 1
    say("every live node agent holds 0 redirects: kube-proxy serves every Service")
    say("now remove the components: kubectl delete -k deploy/default (the agents remove their rules as "
        "their DaemonSet goes)")
    return 0
