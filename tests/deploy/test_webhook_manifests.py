"""The webhook's manifests agree with each other, with the program's defaults and with the issue's contract."""

from __future__ import annotations

import copy
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cli import certs
from sandbox.api.admission import Request, webhook_applies
from sandbox.api.resources import SERVICES
from shared import constants as c
from shared.policy import Action, PolicyConfig, decide
from tests.deploy.manifests import Obj, container, env_of, one, port_number
from webhook.settings import Settings, build_parser, parse_settings

NS = c.DEFAULT_NAMESPACE


def _mwc(objs: list[Obj]) -> Obj:
    return one(objs, "MutatingWebhookConfiguration")


def _webhooks(objs: list[Obj]) -> dict[str, Obj]:
    return {w["name"]: w for w in _mwc(objs)["webhooks"]}


def _webhook(objs: list[Obj]) -> Obj:
    """The main registration."""
    return _webhooks(objs)["services.lightpath.cloud"]


def test_registrations_follow_the_contract(default_objs: list[Obj]) -> None:
    hooks = _webhooks(default_objs)
    assert tuple(hooks) == certs.WEBHOOK_NAMES, "lightpath certs generate patches caBundle into these, in this order"
    for w in hooks.values():
        assert w["admissionReviewVersions"] == ["v1"]
        assert w["sideEffects"] == "None"
        assert w["failurePolicy"] == "Ignore"
        assert 1 <= w["timeoutSeconds"] <= 5
        assert w["matchPolicy"] == "Equivalent"
        assert w["reinvocationPolicy"] == "Never"
        assert w["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                               "resources": ["services"], "scope": "Namespaced"}]
        assert w["clientConfig"] == {"service": {"name": certs.WEBHOOK_SERVICE, "namespace": NS, "path": "/mutate", "port": 443}}
    # Apart from the selectors, the three registrations are identical.
    stripped = [{k: v for k, v in w.items() if k not in ("name", "namespaceSelector", "objectSelector")} for w in hooks.values()]
    assert all(x == stripped[0] for x in stripped)
    assert "objectSelector" not in _webhook(default_objs)


def test_namespace_selector_excludes_what_the_webhook_excludes(default_objs: list[Obj]) -> None:
    """Every registration keeps away exactly the namespaces the program excludes; the main one also
    keeps away opted-out namespaces."""
    deployment_env = env_of(container(one(default_objs, "Deployment", "lightpath-webhook")))
    for w in _webhooks(default_objs).values():
        exprs = {e["key"]: e for e in w["namespaceSelector"]["matchExpressions"]}
        by_name = exprs["kubernetes.io/metadata.name"]
        assert by_name["operator"] == "NotIn"
        assert set(by_name["values"]) == set(c.DEFAULT_EXCLUDED_NAMESPACES) == {"kube-system", "cert-manager", NS}
        assert set(deployment_env["LIGHTPATH_EXCLUDED_NAMESPACES"].split(",")) == set(by_name["values"])
    main = {e["key"]: e for e in _webhook(default_objs)["namespaceSelector"]["matchExpressions"]}
    assert main[c.OPT_LABEL] == {"key": c.OPT_LABEL, "operator": "NotIn", "values": [c.OPT_DISABLED]}
    own = one(default_objs, "Namespace", NS)
    assert own["metadata"]["labels"][c.OPT_LABEL] == c.OPT_DISABLED


NAMESPACE_NAMES = st.sampled_from(["shop", "kube-system", "cert-manager", NS])
OPT = st.sampled_from([None, c.OPT_ENABLED, c.OPT_DISABLED, "yes"])
HANDOFF = st.sampled_from([None, c.DEFAULT_PROXY_NAME, "cilium"])
PORTS = st.lists(st.sampled_from([{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}, {"port": 8080}]),
                 min_size=1, max_size=3)


def _labels(**kv: str | None) -> dict[str, str]:
    return {k: v for k, v in kv.items() if v is not None}


@given(ns=NAMESPACE_NAMES, ns_opt=OPT, svc_opt=OPT, handoff=HANDOFF, ports=PORTS,
       op=st.sampled_from(["CREATE", "UPDATE"]), mode=st.sampled_from(c.MODES))
def test_selectors_send_every_service_the_policy_would_change(
    default_objs: list[Obj], ns: str, ns_opt: str | None, svc_opt: str | None, handoff: str | None,
    ports: list[dict[str, Any]], op: str, mode: str,
) -> None:
    """Whenever shared.policy.decide would label or unlabel a Service, at least one registration sends
    it to the webhook (checked with the sandbox's implementation of kube-apiserver's selector
    matching); in an opted-out namespace only Services carrying our label or opting in are sent."""
    ns_labels = {"kubernetes.io/metadata.name": ns, **_labels(**{c.OPT_LABEL: ns_opt})}
    svc_labels = _labels(**{c.OPT_LABEL: svc_opt, c.SERVICE_PROXY_NAME_LABEL: handoff})
    svc = {"metadata": {"name": "web", "namespace": ns, "labels": svc_labels}, "spec": {"ports": ports}}
    req = Request(SERVICES, op, ns, "web", svc, copy.deepcopy(svc) if op == "UPDATE" else None)
    sent = [w["name"] for w in _mwc(default_objs)["webhooks"] if webhook_applies(w, req, ns_labels)]
    decision = decide(svc, ns_labels, PolicyConfig(mode=mode))
    if decision.action is not Action.LEAVE:
        assert sent, f"{decision.action} ({decision.reason}) but no registration sends the Service"
    if ns in c.DEFAULT_EXCLUDED_NAMESPACES:
        assert sent == []
    if ns_opt == c.OPT_DISABLED and handoff != c.DEFAULT_PROXY_NAME and svc_opt != c.OPT_ENABLED:
        assert sent == [], "an opted-out namespace keeps the webhook out of its ordinary Services"


def test_inject_ca_from_names_the_serving_certificate(default_objs: list[Obj]) -> None:
    ref = _mwc(default_objs)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    namespace, name = ref.split("/")
    cert = one(default_objs, "Certificate", name)
    assert cert["metadata"]["namespace"] == namespace
    assert "isCA" not in cert["spec"], "cainjector must point at the serving certificate"


def test_certificate_covers_the_service_the_webhook_config_points_to(default_objs: list[Obj]) -> None:
    ref = _webhook(default_objs)["clientConfig"]["service"]
    svc = one(default_objs, "Service", ref["name"])
    assert svc["metadata"]["namespace"] == ref["namespace"]
    name = _mwc(default_objs)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")[1]
    dns = set(one(default_objs, "Certificate", name)["spec"]["dnsNames"])
    n, ns = ref["name"], ref["namespace"]
    assert dns == {n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local"}
    assert dns == set(certs.dns_names(n, ns)), "lightpath certs generate must make the same names"
    # The port kube-apiserver dials is a port of that Service.
    assert ref["port"] in [p["port"] for p in svc["spec"]["ports"]]


def test_ca_chain_issuers_exist(default_objs: list[Obj]) -> None:
    """Serving cert <- CA Issuer <- CA Certificate <- selfSigned Issuer, all present."""
    serving = one(default_objs, "Certificate", "lightpath-webhook")
    ca_issuer = one(default_objs, "Issuer", serving["spec"]["issuerRef"]["name"])
    ca_cert = next(o for o in default_objs if o["kind"] == "Certificate" and o["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"])
    assert ca_cert["spec"]["isCA"] is True
    root = one(default_objs, "Issuer", ca_cert["spec"]["issuerRef"]["name"])
    assert root["spec"] == {"selfSigned": {}}


def test_secret_names_agree(default_objs: list[Obj]) -> None:
    """Certificate.secretName == the Deployment's volume == what `lightpath certs generate` writes."""
    serving = one(default_objs, "Certificate", "lightpath-webhook")
    volumes = {v["name"]: v for v in one(default_objs, "Deployment", "lightpath-webhook")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == serving["spec"]["secretName"] == certs.WEBHOOK_SECRET
    assert _mwc(default_objs)["metadata"]["name"] == certs.WEBHOOK_CONFIGURATION
    assert _webhook(default_objs)["clientConfig"]["service"]["name"] == certs.WEBHOOK_SERVICE


def test_ports_probes_and_service_agree_with_the_program(default_objs: list[Obj]) -> None:
    deploy = one(default_objs, "Deployment", "lightpath-webhook")
    ctr = container(deploy)
    settings = parse_settings([], environ=env_of(ctr))
    assert settings.port == c.WEBHOOK_PORT == port_number(ctr, "https")
    svc = one(default_objs, "Service", "lightpath-webhook")
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == 443 and port_number(ctr, svc_port["targetPort"]) == settings.port
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = ctr[probe]["httpGet"]
        assert (get["path"], get["scheme"], port_number(ctr, get["port"])) == (path, "HTTPS", settings.port)


def test_env_is_what_the_program_understands(default_objs: list[Obj]) -> None:
    """Every LIGHTPATH_* variable is one `lightpath-webhook --help` documents, and parses to its default."""
    env = env_of(container(one(default_objs, "Deployment", "lightpath-webhook")))
    documented = set(re.findall(r"env\s+(LIGHTPATH_[A-Z_]+)", build_parser().format_help()))
    assert set(env) <= documented, f"unknown variables: {set(env) - documented}"
    assert env.pop("LIGHTPATH_POD_NAME") == "<from>"  # the Downward API: each replica's own name
    assert parse_settings([], environ=env) == Settings(), "the manifest spells out the defaults; keep them in step"


def test_certificate_files_are_where_the_program_reads_them(default_objs: list[Obj]) -> None:
    ctr = container(one(default_objs, "Deployment", "lightpath-webhook"))
    settings = parse_settings([], environ=env_of(ctr))
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    tls = mounts["tls"]
    assert tls["readOnly"] is True and "subPath" not in tls, "subPath mounts never see a renewed Secret"
    assert settings.tls_cert_file.as_posix() == f"{tls['mountPath']}/tls.crt"
    assert settings.tls_key_file.as_posix() == f"{tls['mountPath']}/tls.key"


def test_deployment_is_hardened_and_highly_available(default_objs: list[Obj]) -> None:
    deploy = one(default_objs, "Deployment", "lightpath-webhook")
    spec, pod = deploy["spec"], deploy["spec"]["template"]["spec"]
    assert spec["replicas"] >= 2
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container(deploy)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    res = container(deploy)["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    assert pod["serviceAccountName"] == "lightpath-webhook"
    pdb = one(default_objs, "PodDisruptionBudget", "lightpath-webhook")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < spec["replicas"], "a PDB that allows no disruption blocks node drains"


def test_rbac_binds_the_pods_service_account(default_objs: list[Obj]) -> None:
    binding = one(default_objs, "ClusterRoleBinding", "lightpath-webhook")
    assert binding["roleRef"]["name"] == "lightpath-webhook"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lightpath-webhook", "namespace": NS}]
    one(default_objs, "ServiceAccount", "lightpath-webhook")
