"""Every pod template passes the Pod Security level its namespace enforces, and each namespace enforces
the strictest level its pods allow (issue 17 item 10: the webhook shared the node agents' privileged
namespace although it passes "restricted").

The checks are the Pod Security Standards' controls for pod templates
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, baseline then restricted), as
kube-apiserver's PodSecurity admission applies them to a Deployment's or DaemonSet's template.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.deploy.manifests import Obj, one

LEVELS = ("privileged", "baseline", "restricted")
ENFORCE = "pod-security.kubernetes.io/enforce"
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                         "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    out = [f"{field}: true" for field in ("hostNetwork", "hostPID", "hostIPC") if pod.get(field)]
    out += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    psc = pod.get("securityContext") or {}
    out += [f"unsafe sysctl {s['name']}" for s in psc.get("sysctls", []) if s["name"] not in SAFE_SYSCTLS]
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod seccompProfile Unconfined")
    for ctr in _containers(pod):
        sc, name = ctr.get("securityContext") or {}, ctr["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        added = set((sc.get("capabilities") or {}).get("add", []))
        if added - BASELINE_CAPABILITIES:
            out.append(f"{name}: capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        out += [f"{name}: hostPort {p['hostPort']}" for p in ctr.get("ports", []) if p.get("hostPort")]
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{name}: procMount {sc['procMount']}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{name}: seccompProfile Unconfined")
    return out


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    out = baseline_violations(pod)
    out += [f"volume {v['name']} of a type restricted forbids" for v in pod.get("volumes", [])
            if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    psc = pod.get("securityContext") or {}
    for ctr in _containers(pod):
        sc, name = ctr.get("securityContext") or {}, ctr["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
    return out


def violations(pod: dict[str, Any], level: str) -> list[str]:
    """What PodSecurity admission at ``level`` would refuse in ``pod`` (empty: admitted)."""
    if level == "privileged":
        return []
    return baseline_violations(pod) if level == "baseline" else restricted_violations(pod)


def strictest_level(pod: dict[str, Any]) -> str:
    return next(level for level in reversed(LEVELS) if not violations(pod, level))


def _workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job", "Pod")]


def _pod(workload: Obj) -> dict[str, Any]:
    return dict(workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"])


def _enforced(objs: list[Obj], namespace: str) -> str:
    labels = one(objs, "Namespace", namespace)["metadata"].get("labels") or {}
    level = labels.get(ENFORCE, "privileged")  # no label: the cluster default, privileged unless configured
    assert level in LEVELS
    return str(level)


@pytest.mark.parametrize("objs_fixture", ["default_objs", "self_signed_objs"])
def test_every_pod_passes_its_namespaces_level(objs_fixture: str, request: pytest.FixtureRequest) -> None:
    objs: list[Obj] = request.getfixturevalue(objs_fixture)
    assert _workloads(objs)
    for workload in _workloads(objs):
        level = _enforced(objs, workload["metadata"]["namespace"])
        problems = violations(_pod(workload), level)
        assert not problems, f"{workload['kind']} {workload['metadata']['name']} breaks {level}: {problems}"


def test_each_namespace_enforces_the_strictest_level_its_pods_allow(default_objs: list[Obj]) -> None:
    """Least privilege: a namespace is no looser than its most demanding pod needs, with audit and warn
    at the same level."""
    namespaces = {o["metadata"]["name"] for o in default_objs if o["kind"] == "Namespace"}
    for namespace in namespaces:
        pods = [_pod(w) for w in _workloads(default_objs) if w["metadata"]["namespace"] == namespace]
        assert pods, f"namespace {namespace} runs nothing"
        needed = min((strictest_level(p) for p in pods), key=LEVELS.index)
        labels = one(default_objs, "Namespace", namespace)["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == needed, (namespace, mode, needed)
    assert _enforced(default_objs, "lightpath-system") == "restricted"
    webhook = one(default_objs, "Deployment", "lightpath-webhook")
    assert webhook["metadata"]["namespace"] == "lightpath-system"
    for name in ("lightpath-redirector", "lightpath-proxy"):
        agent = one(default_objs, "DaemonSet", name)
        assert agent["metadata"]["namespace"] == "lightpath-node"
        assert "hostNetwork: true" in baseline_violations(_pod(agent)), "the node agents do need privileged"


def test_the_checks_catch_what_restricted_refuses(default_objs: list[Obj]) -> None:
    """Not vacuous: each weakened copy of the webhook's pod fails restricted."""
    pod = _pod(one(default_objs, "Deployment", "lightpath-webhook"))
    assert restricted_violations(pod) == []
    weakened: list[tuple[str, Any]] = [
        ("allowPrivilegeEscalation", lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("runAsNonRoot", lambda p: p["securityContext"].pop("runAsNonRoot")),
        ("seccompProfile", lambda p: p["securityContext"].pop("seccompProfile")),
        ("drop ALL", lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[])),
        ("hostPath", lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("hostNetwork", lambda p: p.update(hostNetwork=True)),
        ("runAsUser 0", lambda p: p["securityContext"].update(runAsUser=0)),
    ]
    for what, weaken in weakened:
        broken = copy.deepcopy(pod)
        weaken(broken)
        assert restricted_violations(broken), f"weakening {what} went unnoticed"
