"""The webhook's manifests agree with each other, with the program's defaults and with the issue's contract."""

from __future__ import annotations

import re

from cli import certs
from shared import constants as c
from tests.deploy.manifests import Obj, container, env_of, one, port_number
from webhook.settings import Settings, build_parser, parse_settings

NS = c.DEFAULT_NAMESPACE


def _mwc(objs: list[Obj]) -> Obj:
    return one(objs, "MutatingWebhookConfiguration")


def _webhook(objs: list[Obj]) -> Obj:
    webhooks = _mwc(objs)["webhooks"]
    assert len(webhooks) == 1
    return dict(webhooks[0])


def test_registration_follows_the_contract(default_objs: list[Obj]) -> None:
    w = _webhook(default_objs)
    assert w["admissionReviewVersions"] == ["v1"]
    assert w["sideEffects"] == "None"
    assert w["failurePolicy"] == "Ignore"
    assert 1 <= w["timeoutSeconds"] <= 5
    assert w["matchPolicy"] == "Equivalent"
    assert w["reinvocationPolicy"] == "Never"
    assert w["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                           "resources": ["services"], "scope": "Namespaced"}]
    assert w["clientConfig"]["service"]["path"] == "/mutate"
    assert "objectSelector" not in w


def test_namespace_selector_excludes_what_the_webhook_excludes(default_objs: list[Obj]) -> None:
    """The selector keeps away exactly the namespaces the program excludes, plus opted-out namespaces."""
    exprs = {e["key"]: e for e in _webhook(default_objs)["namespaceSelector"]["matchExpressions"]}
    by_name = exprs["kubernetes.io/metadata.name"]
    assert by_name["operator"] == "NotIn"
    assert set(by_name["values"]) == set(c.DEFAULT_EXCLUDED_NAMESPACES) == {"kube-system", "cert-manager", NS}
    deployment_env = env_of(container(one(default_objs, "Deployment", "lightpath-webhook")))
    assert set(deployment_env["LIGHTPATH_EXCLUDED_NAMESPACES"].split(",")) == set(by_name["values"])
    assert exprs[c.OPT_LABEL] == {"key": c.OPT_LABEL, "operator": "NotIn", "values": [c.OPT_DISABLED]}
    own = one(default_objs, "Namespace", NS)
    assert own["metadata"]["labels"][c.OPT_LABEL] == c.OPT_DISABLED


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
