"""JSON Schema of `lightpath status -o json`: what a script may rely on (tests validate real output)."""

from __future__ import annotations

from typing import Any

PORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "port", "protocol", "appProtocol"],
    "properties": {
        "name": {"type": "string"},
        "port": {"type": ["integer", "null"]},
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        "appProtocol": {"enum": ["http", "tcp"]},
    },
}
HANDLER = {"type": "string", "pattern": "^(kube-proxy|lightpath|other:.+)$"}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "items", "summary"],
    "properties": {
        "apiVersion": {"const": "lightpath.cloud/v1"},
        "kind": {"const": "ServiceStatusList"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "namespace",
                    "name",
                    "type",
                    "ports",
                    "portsText",
                    "handledBy",
                    "wants",
                    "action",
                    "reason",
                    "eligible",
                    "pending",
                    "handover",
                ],
                "properties": {
                    "namespace": {"type": "string", "minLength": 1},
                    "name": {"type": "string", "minLength": 1},
                    "type": {"type": "string"},
                    "ports": {"type": "array", "items": PORT_SCHEMA},
                    "portsText": {"type": "string"},
                    "handledBy": HANDLER,
                    "wants": HANDLER,
                    "action": {"enum": ["label", "unlabel", "leave"]},
                    "reason": {"type": "string", "minLength": 1},
                    "eligible": {"type": "boolean"},
                    "pending": {"type": "boolean"},
                    "handover": {"type": ["string", "null"]},
                },
            },
        },
        "summary": {
            "type": "object",
            "additionalProperties": False,
            "required": ["total", "lightpath", "kubeProxy", "otherProxy", "pending", "ineligible"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ["total", "lightpath", "kubeProxy", "otherProxy", "pending", "ineligible"]
            },
        },
    },
}
