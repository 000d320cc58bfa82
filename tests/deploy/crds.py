"""Validate custom resources against their CustomResourceDefinition's openAPIV3Schema.

jsonschema checks types, enums, required fields and patterns; on top of that `unknown_fields` reports
fields the schema does not declare, which kube-apiserver would prune (or reject with strict field
validation): that is how a typo such as `renewbefore:` gets caught.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import CRD_DIR


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of every served version in ../shared/testdata."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"cert-manager CRDs not found at {CRD_DIR} (the checkout's ../shared/testdata); cannot validate Certificate/Issuer")
    return _load()


@functools.cache
def _load() -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(Path(CRD_DIR).glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """All problems with obj, as readable strings (empty when valid)."""
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    problems += [f"{path}: field not declared in the CRD schema" for path in unknown_fields(obj, schema)]
    return problems


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            where = f"{path}.{key}" if path else key
            if props is not None and key in props:
                out += unknown_fields(child, props[key], where)
            elif isinstance(extra, dict):
                out += unknown_fields(child, extra, where)
            elif props is not None:
                out.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out
