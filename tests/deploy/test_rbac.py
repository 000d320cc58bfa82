"""RBAC grants exactly what the code calls.

The calls are read from the source, turned into (apiGroup, resource, verb):
- a `shared.kubeapi.Api` method called with one of that module's `Kind` constants (the way the agent and the
  webhook call the API): `get`/`create`/`patch` are those verbs, `replace` is update, `read_list` is list
  (watch with watch=True), `lister(KIND)` is list and watch (a Reflector list-watches with it) or list alone
  when handed to the pager `pages(...)`;
- an attribute of a generated `kubernetes.client` API class (e.g. `CoreV1Api.list_namespace`): `read_*` is
  get, `list_*` is list (watch when called with watch=True, both when passed un-called to `Watch().stream`),
  and so on.
A new API call without a matching rule, or a rule nothing uses, fails. `get` may accompany `list` on the same
resource: it reveals nothing that list does not.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import kubernetes.client
import pytest

from shared import kubeapi
from tests.deploy.manifests import REPO, Obj, one

Grant = tuple[str, str, str]  # (apiGroup, resource, verb)

# snake_case kind in the client's method names -> (API group, resource). Extend when the code grows.
RESOURCES: dict[str, tuple[str, str]] = {
    "namespace": ("", "namespaces"),
    "service": ("", "services"),
    "service_status": ("", "services/status"),
    "endpoints": ("", "endpoints"),
    "endpoint_slice": ("discovery.k8s.io", "endpointslices"),
    "node": ("", "nodes"),
    "pod": ("", "pods"),
    "event": ("", "events"),
    "config_map": ("", "configmaps"),
    "secret": ("", "secrets"),
    "lease": ("coordination.k8s.io", "leases"),
    "daemon_set": ("apps", "daemonsets"),
    "mutating_webhook_configuration": ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
}
API_CLASSES = (kubernetes.client.CoreV1Api, kubernetes.client.DiscoveryV1Api, kubernetes.client.CoordinationV1Api,
               kubernetes.client.AdmissionregistrationV1Api, kubernetes.client.AppsV1Api)
VERBS = {"read": "get", "list": "list", "create": "create", "patch": "patch", "replace": "update",
         "delete_collection": "deletecollection", "delete": "delete"}
_METHOD = re.compile(r"^(read|list|create|patch|replace|delete_collection|delete)_(?:namespaced_)?(\w+?)(?:_for_all_namespaces)?$")


# shared.kubeapi's Kind constants by name, and its Api methods -> verb.
KINDS: dict[str, kubeapi.Kind] = {n: k for n, k in vars(kubeapi).items() if isinstance(k, kubeapi.Kind)}
KUBEAPI_VERBS = {"get": "get", "create": "create", "patch": "patch", "replace": "update", "read_list": "list",
                 "lister": "list"}


def _kind_grant(kind: kubeapi.Kind) -> tuple[str, str]:
    group = kind.group_version.rpartition("/")[0]
    return group, kind.plural


def _kubeapi_verbs(call: ast.Call, parent: ast.Call | None) -> set[str]:
    """The verbs of one `Api.<method>(KIND, ...)` call (see the module docstring)."""
    assert isinstance(call.func, ast.Attribute)
    method = call.func.attr
    if method == "lister":
        handed_to = parent.func if parent is not None else None
        pager = (isinstance(handed_to, ast.Attribute) and handed_to.attr == "pages") or (
            isinstance(handed_to, ast.Name) and handed_to.id == "pages")
        return {"list"} if pager else {"list", "watch"}
    if method == "read_list":
        watch = next((k.value for k in call.keywords if k.arg == "watch"), None)
        if isinstance(watch, ast.Constant):
            return {"watch"} if watch.value else {"list"}
        return {"list"} if watch is None else {"list", "watch"}
    return {KUBEAPI_VERBS[method]}


def _kind_of(arg: ast.expr) -> kubeapi.Kind | None:
    name = arg.id if isinstance(arg, ast.Name) else arg.attr if isinstance(arg, ast.Attribute) else None
    return KINDS.get(name) if name is not None else None


@functools.cache
def api_methods() -> frozenset[str]:
    """The resource methods of the API classes of the groups in RESOURCES (importing all 66 classes is slow)."""
    names: set[str] = set()
    for cls in API_CLASSES:
        names |= {n for n in vars(cls) if _METHOD.match(n) and not n.endswith("_with_http_info")}
    return frozenset(names)


def called(package: str) -> set[Grant]:
    """(group, resource, verb) for every Kubernetes API call in the package's source."""
    methods = api_methods()
    grants: set[Grant] = set()
    calls: dict[int, ast.Call] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        parents: dict[int, ast.Call] = {}  # id(call) -> the call it is an argument of
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                calls[id(node.func)] = node
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    parents[id(arg)] = node
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KUBEAPI_VERBS
                    and node.args and (kind := _kind_of(node.args[0])) is not None):
                group, resource = _kind_grant(kind)
                grants |= {(group, resource, v) for v in _kubeapi_verbs(node, parents.get(id(node)))}
            if isinstance(node, ast.Attribute) and node.attr in ("call_api", "DynamicClient"):
                pytest.fail(f"{path}: {node.attr} bypasses the typed client; extend this test to read its calls")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in methods):
                continue
            verb_word, kind = _METHOD.match(node.attr).groups()  # type: ignore[union-attr]
            assert kind in RESOURCES, f"{path}: {node.attr}: add {kind!r} to RESOURCES in {Path(__file__).name}"
            group, resource = RESOURCES[kind]
            verbs = {VERBS[verb_word]}
            call = calls.get(id(node))
            if verb_word == "list":
                watch = next((k.value for k in call.keywords if k.arg == "watch"), None) if call else None
                if call is None:  # passed un-called, e.g. Watch().stream(api.list_x): lists, then watches
                    verbs = {"list", "watch"}
                elif isinstance(watch, ast.Constant):
                    verbs = {"watch"} if watch.value else {"list"}
                elif watch is not None:
                    verbs = {"list", "watch"}
            grants |= {(group, resource, v) for v in verbs}
    return grants


def granted(objs: list[Obj], role: str) -> set[Grant]:
    """The ClusterRole's grants plus those of a namespaced Role of the same name (the agent's own Lease)."""
    rules = list(one(objs, "ClusterRole", role)["rules"])
    rules += [rule for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == role for rule in o["rules"]]
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _check(objs: list[Obj], role: str, package: str) -> None:
    used = called(package)
    if not used:
        pytest.skip(f"{package}/ makes no Kubernetes API call yet; nothing to compare {role}'s RBAC with")
    have = granted(objs, role)
    missing = used - have
    implied_get = {(g, r, "get") for (g, r, v) in have if v == "list"}
    unused = have - used - implied_get
    assert not missing, f"{package}/ calls {sorted(missing)} but ClusterRole {role} does not grant it"
    assert not unused, f"ClusterRole {role} grants {sorted(unused)} that {package}/ never uses"
    assert not any("*" in part for grant in have for part in grant), "no wildcards"


def test_webhook_rbac_matches_its_calls(default_objs: list[Obj]) -> None:
    assert {("", "namespaces", v) for v in ("get", "list", "watch")} <= called("webhook")
    _check(default_objs, "lightpath-webhook", "webhook")


def test_redirector_rbac_matches_its_calls(default_objs: list[Obj]) -> None:
    _check(default_objs, "lightpath-redirector", "redirector")


def test_no_namespaced_roles_and_nothing_else_is_bound(default_objs: list[Obj]) -> None:
    """Namespaced Roles in the agents' namespace only: the agents write their Leases and watch their DaemonSet
    (by name); the webhook's handover controller reads those Leases and holds its leader-election Lease."""
    roles = [o for o in default_objs if o["kind"] in ("Role", "RoleBinding")]
    assert sorted((o["kind"], o["metadata"]["name"], o["metadata"]["namespace"]) for o in roles) == [
        ("Role", "lightpath-redirector", "lightpath-node"), ("Role", "lightpath-webhook", "lightpath-node"),
        ("RoleBinding", "lightpath-redirector", "lightpath-node"), ("RoleBinding", "lightpath-webhook", "lightpath-node")]
    webhook_role = next(o for o in roles if o["kind"] == "Role" and o["metadata"]["name"] == "lightpath-webhook")
    assert {r for rule in webhook_role["rules"] for r in rule["resources"]} == {"leases"}
    (role,) = [o for o in roles if o["kind"] == "Role" and o["metadata"]["name"] == "lightpath-redirector"]
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"leases", "daemonsets"}
    (ds_rule,) = [rule for rule in role["rules"] if rule["resources"] == ["daemonsets"]]
    ds = one(default_objs, "DaemonSet", "lightpath-redirector")
    assert ds_rule["resourceNames"] == [ds["metadata"]["name"]]  # that one object, nothing else
    bound = {(b["roleRef"]["name"], s["name"]) for b in default_objs if b["kind"] == "ClusterRoleBinding" for s in b["subjects"]}
    assert bound == {("lightpath-webhook", "lightpath-webhook"), ("lightpath-redirector", "lightpath-redirector")}
    # The example proxy talks to no API server: no token in its pods.
    proxy = one(default_objs, "DaemonSet", "lightpath-proxy")["spec"]["template"]["spec"]
    assert proxy.get("automountServiceAccountToken") is False


def test_the_scanner_reads_calls_the_way_they_are_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: plain calls, watch=True, and a method handed to Watch().stream are all seen."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "def f(api, w, flag):\n"
        "    api.read_namespaced_service('a', 'b')\n"
        "    api.list_namespace(watch=True)\n"
        "    w.stream(api.list_namespaced_endpoint_slice, 'ns')\n"
        "    api.patch_namespaced_service('a', 'b', {})\n"
        "    api.list_node(watch=flag)\n"
        "def g(kube, pager, Reflector):\n"
        "    Reflector(kube.lister(SERVICES), None)\n"
        "    pager.pages(kube.lister(DAEMON_SETS))\n"
        "    kube.get(LEASES, 'ns', 'a'); kube.replace(LEASES, 'ns', 'a', {}); kube.create(EVENTS, 'ns', {})\n"
        "    kube.patch(kubeapi.DAEMON_SETS, 'ns', 'a', {}); kube.read_list(NAMESPACES)\n"
        "    {}.get('SERVICES'); kube.get(other, 'x')\n"
    )
    monkeypatch.setattr("tests.deploy.test_rbac.REPO", tmp_path)
    assert called("pkg") == {
        ("", "services", "get"), ("", "namespaces", "watch"), ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"), ("", "services", "patch"), ("", "nodes", "list"), ("", "nodes", "watch"),
        ("", "services", "list"), ("", "services", "watch"), ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "update"), ("", "events", "create"), ("apps", "daemonsets", "patch"), ("apps", "daemonsets", "list"),
        ("", "namespaces", "list"),
    }
