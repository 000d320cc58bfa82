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
                    "traffic",
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
                    # what the node Envoys saw, from the agents' Leases; null: no traffic reported
                    "traffic": {"oneOf": [{"type": "null"}, {
                        "type": "object", "additionalProperties": False,
                        "required": ["requestsPerSecond", "errorsPerSecond", "retriesPerSecond", "p99Milliseconds",
                                     "nodes", "windowSeconds"],
                        "properties": {
                            "requestsPerSecond": {"type": "number", "minimum": 0},
                            "errorsPerSecond": {"type": "number", "minimum": 0},
                            "retriesPerSecond": {"type": "number", "minimum": 0},
                            "p99Milliseconds": {"type": ["number", "null"], "minimum": 0},
                            "nodes": {"type": "integer", "minimum": 1},
                            "windowSeconds": {"type": "number", "minimum": 0}}}]},
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

SERVICE_REF = {"type": "string", "pattern": "^[^/]+/[^/]+$"}
REPORT_SCHEMA: dict[str, Any] = {
    "$comment": "`lightpath migrate|rollback|reconcile -o json`",
    "type": "object",
    "additionalProperties": False,
    "required": ["verb", "ok", "interrupted", "namespacesChanged", "changed", "verified", "failed", "notAttempted",
                 "unchanged", "skipped", "paths", "durationSeconds", "durations", "aborted"],
    "properties": {
        "verb": {"enum": ["migrate", "rollback", "reconcile"]},
        "ok": {"type": "boolean"},
        "interrupted": {"type": "boolean"},
        "namespacesChanged": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "changed": {"type": "array", "items": SERVICE_REF},
        "verified": {"type": "array", "items": SERVICE_REF},
        "failed": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["service", "message"],
            "properties": {"service": {"type": "string"}, "message": {"type": "string", "minLength": 1}}}},
        "notAttempted": {"type": "array", "items": SERVICE_REF},
        "unchanged": {"type": "array", "items": SERVICE_REF},
        "skipped": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["service", "reason"],
            "properties": {"service": SERVICE_REF, "reason": {"type": "string", "minLength": 1}}}},
        "paths": {"type": "object", "additionalProperties": {"enum": ["webhook", "direct", "handover"]}},
        # seconds: the whole run, and each verified Service from the start of its batch (handover included)
        "durationSeconds": {"type": "number", "minimum": 0},
        "durations": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "aborted": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["service", "nodes"],
            "properties": {"service": SERVICE_REF, "nodes": {"type": "array", "minItems": 1,
                                                             "items": {"type": "string", "minLength": 1}}}}},
    },
}
