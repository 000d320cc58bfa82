"""The resource types the double serves, and the discovery documents that describe them.

WHY: clients find resources through discovery (/api, /apis, group versions) and address them by
group/version/plural; one table here drives routing, list kinds and discovery, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified(self) -> str:
        """plural.group, as error messages name a resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


NAMESPACES = ResourceType("", "v1", "namespaces", "Namespace", False, ("ns",))
SERVICES = ResourceType("", "v1", "services", "Service", True, ("svc",), ("status",))
ENDPOINTSLICES = ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True)
NODES = ResourceType("", "v1", "nodes", "Node", False, ("no",))
LEASES = ResourceType("coordination.k8s.io", "v1", "leases", "Lease", True)
DAEMONSETS = ResourceType("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",))
EVENTS = ResourceType("", "v1", "events", "Event", True, ("ev",))  # core/v1: what `kubectl describe` lists
MUTATING_WEBHOOKS = ResourceType(
    "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False
)

ALL: tuple[ResourceType, ...] = (
    NAMESPACES, SERVICES, ENDPOINTSLICES, NODES, LEASES, DAEMONSETS, EVENTS, MUTATING_WEBHOOKS
)


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    for rt in ALL:
        if (rt.group, rt.version, rt.plural) == (group, version, plural):
            return rt
    return None


def group_versions() -> dict[str, list[str]]:
    """group -> versions served (core group excluded)."""
    out: dict[str, list[str]] = {}
    for rt in ALL:
        if rt.group and rt.version not in out.setdefault(rt.group, []):
            out[rt.group].append(rt.version)
    return out


def _resource_entries(rt: ResourceType) -> list[dict[str, Any]]:
    entry: dict[str, Any] = {
        "name": rt.plural,
        "singularName": rt.kind.lower(),
        "namespaced": rt.namespaced,
        "kind": rt.kind,
        "verbs": VERBS,
    }
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    entries = [entry]
    for sub in rt.subresources:
        entries.append(
            {
                "name": f"{rt.plural}/{sub}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }
        )
    return entries


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    """The APIResourceList for one group version, or None when not served."""
    types = [rt for rt in ALL if rt.group == group and rt.version == version]
    if not types:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [e for rt in types for e in _resource_entries(rt)],
    }


def core_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": gvs, "preferredVersion": gvs[0]}


def group_list() -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, vs) for g, vs in group_versions().items()],
    }


def api_group(name: str) -> dict[str, Any] | None:
    versions = group_versions().get(name)
    return _group(name, versions) if versions else None


VERSION_INFO: dict[str, str] = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-04-17T00:00:00Z",
    "goVersion": "go1.22.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
