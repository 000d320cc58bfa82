"""The node-level pieces (redirector and example proxy) fit each other and the program's defaults."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from controlplane.resources import ListenerBuilder, bootstrap
from redirector.config import ENV_PREFIX, OPTIONS, Settings, settings_from
from shared import constants as c
from tests.deploy.manifests import Obj, container, one, port_number


def _redirector(objs: list[Obj]) -> Obj:
    return one(objs, "DaemonSet", "lightpath-redirector")


def _plain_env(ctr: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in ctr.get("env", []) if "value" in e}


def _redirector_settings(objs: list[Obj]) -> Settings:
    return settings_from(argparse.Namespace(), environ=_plain_env(container(_redirector(objs))))


def test_redirector_daemonset_runs_on_every_node_with_only_netfilter_capabilities(default_objs: list[Obj]) -> None:
    ds = _redirector(default_objs)
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    ctr = container(ds)
    sc = ctr["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert {"cpu", "memory"} <= set(ctr["resources"]["limits"])
    lock = next(v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/run/xtables.lock")
    assert lock["hostPath"]["type"] == "FileOrCreate"
    assert {"name": lock["name"], "mountPath": "/run/xtables.lock"} in ctr["volumeMounts"]
    node = next(e for e in ctr["env"] if e["name"] == "LIGHTPATH_NODE_NAME")
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert pod["serviceAccountName"] == "lightpath-redirector"


def test_redirector_env_is_what_the_program_understands(default_objs: list[Obj]) -> None:
    known = {ENV_PREFIX + suffix for _flag, suffix, *_ in OPTIONS}
    env = {e["name"] for e in container(_redirector(default_objs))["env"]}
    assert env <= known, f"unknown variables: {env - known}"
    settings = _redirector_settings(default_objs)
    assert settings.proxy_name == c.DEFAULT_PROXY_NAME
    assert settings.backend == "nftables"


def test_redirector_probes_hit_its_always_on_health_server(default_objs: list[Obj]) -> None:
    """Not the debug server: turning that off (LIGHTPATH_DEBUG_PORT=0) must not fail a probe."""
    settings = _redirector_settings(default_objs)
    ctr = container(_redirector(default_objs))
    assert settings.health_address == c.REDIRECTOR_HEALTH_ADDRESS == "127.0.0.1"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = ctr[probe]["httpGet"]
        assert get["host"] == settings.health_address and get["path"] == path
        assert port_number(ctr, get["port"]) == settings.health_port == c.REDIRECTOR_HEALTH_PORT
    assert port_number(ctr, "healthz") == settings.health_port
    assert port_number(ctr, "debug") == settings.debug_port == c.REDIRECTOR_DEBUG_PORT


def test_redirector_command_is_a_real_subcommand(default_objs: list[Obj]) -> None:
    args = container(_redirector(default_objs))["args"]
    assert args == ["run"]
    proc = subprocess.run([sys.executable, "-m", "redirector", "--help"], capture_output=True, text=True, timeout=60, check=False)
    if "No module named redirector.__main__" in proc.stderr:
        pytest.skip("redirector/__main__.py does not exist yet; cannot check the `run` subcommand")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\brun\b", proc.stdout), proc.stdout


def _proxy(objs: list[Obj]) -> Obj:
    return one(objs, "DaemonSet", "lightpath-proxy")


def _envoy_files(objs: list[Obj]) -> dict[str, Any]:
    return {k: yaml.safe_load(v) for k, v in one(objs, "ConfigMap", "lightpath-proxy")["data"].items()}


def test_proxy_listens_where_the_redirector_sends_traffic(default_objs: list[Obj]) -> None:
    """The agent's control plane gives Envoy its listeners: on the proxy port the agent redirects to, for both
    families; Envoy finds the control plane on the socket the agent serves, through one shared hostPath."""
    settings = _redirector_settings(default_objs)
    assert settings.proxy_port == c.DEFAULT_PROXY_PORT
    for family, address in ((4, "0.0.0.0"), (6, "::")):
        listener = ListenerBuilder(family, settings.proxy_port).listener
        assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (
            address, settings.proxy_port)
        assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.original_dst"]
        # Unset means true (Envoy 1.40): the old and the surge Envoy both bind the port during a rollout.
        assert not listener.HasField("enable_reuse_port") or listener.enable_reuse_port.value
    boot = _envoy_files(default_objs)["envoy.yaml"]
    (cluster,) = boot["static_resources"]["clusters"]
    pipe = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]["path"]
    assert settings.xds_socket is not None and pipe == str(settings.xds_socket)
    assert boot["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    mounts = []
    for ds in (_redirector(default_objs), _proxy(default_objs)):
        spec = ds["spec"]["template"]["spec"]
        (mount,) = [m for m in container(ds)["volumeMounts"] if pipe.startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        mounts.append(volume["hostPath"]["path"])
    assert mounts[0] == mounts[1] == str(settings.xds_socket.parent)


def test_proxy_traffic_is_exempt_from_redirects(default_objs: list[Obj]) -> None:
    """Envoy's own upstream connections must not be redirected back to Envoy: its UID is the exempt one."""
    settings = _redirector_settings(default_objs)
    pod = _proxy(default_objs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == settings.proxy_uid
    assert settings.proxy_mark == c.DEFAULT_PROXY_MARK


def _admin_address_file(ctr: Obj) -> str:
    args = ctr["args"]
    path = str(args[args.index("--admin-address-path") + 1])
    (mount,) = [m for m in ctr["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert not mount.get("readOnly"), "Envoy writes it"
    return path


def test_proxy_admin_is_loopback_only_and_probed(default_objs: list[Obj]) -> None:
    """Admin on a kernel-picked loopback port (two Envoys share the node in a rollout), found by the probes
    through the file Envoy writes, in a per-pod volume (a shared one would let one pod probe the other)."""
    admin = _envoy_files(default_objs)["envoy.yaml"]["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": 0}
    ctr = container(_proxy(default_objs))
    path = _admin_address_file(ctr)
    pod = _proxy(default_objs)["spec"]["template"]["spec"]
    volume = next(m["name"] for m in ctr["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert next(v for v in pod["volumes"] if v["name"] == volume)["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    hooks = {"readiness": ctr["readinessProbe"]["exec"]["command"], "liveness": ctr["livenessProbe"]["exec"]["command"],
             "preStop": ctr["lifecycle"]["preStop"]["exec"]["command"]}
    for name, command in hooks.items():
        assert command[:2] == ["/bin/bash", "-c"] and f"a=$(< {path})" in command[2], name  # no curl in the image
    assert "server%%5C.state" in hooks["readiness"][2] and "total_listeners_active" in hooks["readiness"][2]
    assert pod["hostNetwork"] is True and {"operator": "Exists"} in pod["tolerations"]
    mount = next(m for m in ctr["volumeMounts"] if m["name"] == "config")
    assert f"{mount['mountPath']}/envoy.yaml" in ctr["args"]


def test_shipped_bootstrap_is_the_one_the_product_generates(default_objs: list[Obj]) -> None:
    """deploy/proxy ships ``lightpath-redirector bootstrap`` verbatim (regenerate it with that command)."""
    settings = _redirector_settings(default_objs)
    shipped = _envoy_files(default_objs)["envoy.yaml"]
    assert settings.xds_socket is not None
    assert shipped == bootstrap(node_id="lightpath-proxy", xds_socket=str(settings.xds_socket), admin_port=0, mark=None)
    args = container(_proxy(default_objs))["args"]
    assert args[args.index("--service-node") + 1] == "$(NODE_NAME)"  # the node id the agent expects


def test_ports_do_not_collide(default_objs: list[Obj]) -> None:
    """Host ports of the hostNetwork pods are distinct and none is kube-proxy's."""
    ports = [p["containerPort"] for ds in (_redirector(default_objs), _proxy(default_objs)) for p in container(ds).get("ports", [])]
    assert len(ports) == len(set(ports))
    assert not set(ports) & {10249, 10256}


def test_proxy_rolls_out_make_before_break(default_objs: list[Obj]) -> None:
    """Issue 15 point 2: the new Envoy starts beside the old one (surge, nothing unavailable), which the
    scheduler allows only without host ports (a hostNetwork containerPort is one); the old one drains
    through admin before its SIGTERM, within the grace period."""
    ds = _proxy(default_objs)
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    ctr = container(ds)
    assert "ports" not in ctr
    args = ctr["args"]
    drain = int(args[args.index("--drain-time-s") + 1])
    assert (drain, args[args.index("--drain-strategy") + 1]) == (20, "immediate")
    script = ctr["lifecycle"]["preStop"]["exec"]["command"][2]
    assert script.index("admin POST '/drain_listeners?graceful'") < script.index("admin POST /drain_listeners >")
    assert f"for _ in $(seq {drain}); do" in script and "total_connections: 0" in script
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == drain + 10


def test_node_agents_run_on_linux_nodes_only(default_objs: list[Obj]) -> None:
    """Issue 17 item 8: both DaemonSets tolerated every taint with no OS selector, so they landed on
    Windows nodes (nftables, a linux image). Every Linux node still gets them, tainted or not, like kube-proxy."""
    for ds in (_redirector(default_objs), _proxy(default_objs)):
        pod = ds["spec"]["template"]["spec"]
        assert pod.get("nodeSelector") == {"kubernetes.io/os": "linux"}, ds["metadata"]["name"]
        assert pod["tolerations"] == [{"operator": "Exists"}], ds["metadata"]["name"]
        assert "affinity" not in pod, "nothing else narrows the nodes"


def _quota_covers(quota: Obj, priority_class: str) -> bool:
    for expr in quota["spec"].get("scopeSelector", {}).get("matchExpressions", []):
        if expr["scopeName"] == "PriorityClass" and expr["operator"] == "In" and priority_class in expr["values"]:
            return True
    return False


def test_system_priority_pods_have_a_covering_quota_in_their_namespace(default_objs: list[Obj]) -> None:
    """Issue 17 item 9: clusters that limit system-node-critical to namespaces with a covering
    ResourceQuota (GKE) refuse the pods without one ("insufficient quota to match these scopes")."""
    critical = [w for w in default_objs if w["kind"] in ("DaemonSet", "Deployment")
                and str(w["spec"]["template"]["spec"].get("priorityClassName", "")).startswith("system-")]
    assert {w["metadata"]["name"] for w in critical} == {"lightpath-redirector", "lightpath-proxy"}
    nodes = 5_000  # the largest clusters Kubernetes supports
    for workload in critical:
        cls = workload["spec"]["template"]["spec"]["priorityClassName"]
        quotas = [q for q in default_objs if q["kind"] == "ResourceQuota"
                  and q["metadata"]["namespace"] == workload["metadata"]["namespace"] and _quota_covers(q, cls)]
        assert quotas, f"{workload['metadata']['name']}: no ResourceQuota covers priority class {cls} in its namespace"
        hard = quotas[0]["spec"]["hard"]["pods"]
        assert int(hard.removesuffix("k")) * (1000 if hard.endswith("k") else 1) >= 2 * nodes


def test_envoy_can_reach_the_xds_socket_the_agent_creates_without_cap_chown(default_objs: list[Obj]) -> None:
    """The agent has no CAP_CHOWN, so the socket keeps the agent's group: that must be the proxy's group."""
    agent = container(_redirector(default_objs))["securityContext"]
    proxy = _proxy(default_objs)["spec"]["template"]["spec"]["securityContext"]
    assert "CHOWN" not in agent["capabilities"]["add"]
    assert agent["runAsGroup"] == proxy["runAsGroup"]


def test_the_agent_can_write_the_nodes_network_sysctls(default_objs: list[Obj]) -> None:
    """tcp_migrate_req (redirector/sysctls.py) lives in the node's /proc/sys/net, read-only in a container
    unless mounted: the mount and --proc-sys must agree."""
    from redirector.sysctls import REQUIRED, path

    ds = _redirector(default_objs)
    pod, ctr = ds["spec"]["template"]["spec"], container(ds)
    settings = _redirector_settings(default_objs)
    assert settings.proc_sys is not None
    volume = next(v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/proc/sys/net")
    mount = next(m for m in ctr["volumeMounts"] if m["name"] == volume["name"])
    assert not mount.get("readOnly") and mount["mountPath"] == str(settings.proc_sys / "net")
    for setting in REQUIRED:
        assert str(path(settings.proc_sys, setting.name)).startswith(mount["mountPath"] + "/")


def test_the_preserve_source_ip_overlay_gives_envoy_net_admin_and_turns_the_feature_on(default_objs: list[Obj]) -> None:
    """deploy/overlays/preserve-source-ip (docs/conformance.md row 6): Envoy can open transparent upstream
    connections (CAP_NET_ADMIN is only effective for root in a container), nothing else is granted, and the
    agent exempts Envoy by its mark alone (exempting uid 0 would exempt every root process of the node)."""
    from tests.deploy.manifests import REPO, kustomize

    objs = kustomize(REPO / "deploy" / "overlays" / "preserve-source-ip")
    settings = _redirector_settings(objs)
    assert settings.preserve_source_ip == "on" and settings.transparent_port == c.DEFAULT_TRANSPARENT_PORT
    assert settings.proxy_uid is None and settings.proxy_mark == c.DEFAULT_PROXY_MARK
    proxy = _proxy(objs)["spec"]["template"]["spec"]
    assert proxy["securityContext"]["runAsUser"] == 0 and proxy["securityContext"]["runAsNonRoot"] is False
    sc = container(_proxy(objs))["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    # Every upstream socket of this Envoy carries the mark the agent exempts (no UID exemption here).
    assert settings.xds_socket is not None
    assert _envoy_files(objs)["envoy.yaml"] == bootstrap(node_id="lightpath-proxy", xds_socket=str(settings.xds_socket),
                                                         admin_port=0, mark=c.DEFAULT_PROXY_MARK)
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    # Everything else is deploy/default's, unchanged.
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [(o["kind"], o["metadata"]["name"]) for o in default_objs]
    same_env = {k: v for k, v in _plain_env(container(_redirector(objs))).items()
                if k not in ("LIGHTPATH_PRESERVE_SOURCE_IP", "LIGHTPATH_PROXY_UID")}
    assert same_env == {k: v for k, v in _plain_env(container(_redirector(default_objs))).items() if k != "LIGHTPATH_PROXY_UID"}
