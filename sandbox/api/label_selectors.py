"""Label and field selectors, in both forms the API uses: query strings and LabelSelector objects.

WHY: list/watch filtering and webhook namespace/object selectors must follow the real semantics
(e.g. `!=` and `notin` also match objects WITHOUT the key), or the components under test would be
exercised against rules no cluster applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.api.errors import ApiError

# One requirement: key, operator, values. Operators as the API names them in LabelSelector objects.
IN, NOT_IN, EXISTS, NOT_EXISTS = "In", "NotIn", "Exists", "DoesNotExist"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == EXISTS:
            return self.key in labels
        if self.operator == NOT_EXISTS:
            return self.key not in labels
        if self.operator == IN:
            return self.key in labels and labels[self.key] in self.values
        if self.operator == NOT_IN:
            return self.key not in labels or labels[self.key] not in self.values
        raise AssertionError(self.operator)


Selector = tuple[Requirement, ...]

_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|[^\s(),!=]+)")
_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise ApiError(400, f"unable to parse requirement: invalid label selector {text!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def _check_key(key: str, text: str) -> str:
    if not _KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise ApiError(400, f"unable to parse requirement: invalid label key {key!r} in selector {text!r}")
    return key


def _check_value(value: str, text: str) -> str:
    if not _VALUE.match(value) or len(value) > 63:
        raise ApiError(400, f"unable to parse requirement: invalid label value {value!r} in selector {text!r}")
    return value


def parse_label_selector(text: str | None) -> Selector:
    """Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k` into requirements (400 on a malformed selector)."""
    if not text or not text.strip():
        return ()
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise ApiError(400, f"unable to parse requirement: unexpected end of label selector {text!r}")
        i += 1
        return toks[i - 1]

    while i < len(toks):
        tok = take()
        if tok == "!":
            reqs.append(Requirement(_check_key(take(), text), NOT_EXISTS))
        else:
            key = _check_key(tok, text)
            op = toks[i] if i < len(toks) else ","
            if op == ",":
                reqs.append(Requirement(key, EXISTS))
            elif op in ("=", "==", "!="):
                i += 1
                value = toks[i] if i < len(toks) and toks[i] != "," else ""
                if value:
                    i += 1
                _check_value(value, text)
                reqs.append(Requirement(key, NOT_IN if op == "!=" else IN, frozenset({value})))
            elif op in ("in", "notin"):
                i += 1
                if take() != "(":
                    raise ApiError(400, f"unable to parse requirement: expected '(' after {op} in {text!r}")
                values: set[str] = set()
                while True:
                    t = take()
                    if t == ")":
                        break
                    if t == ",":
                        continue
                    values.add(_check_value(t, text))
                reqs.append(Requirement(key, IN if op == "in" else NOT_IN, frozenset(values)))
            else:
                raise ApiError(400, f"unable to parse requirement: unexpected {op!r} in label selector {text!r}")
        if i < len(toks):
            if toks[i] != ",":
                raise ApiError(400, f"unable to parse requirement: expected ',' in label selector {text!r}")
            i += 1
    return tuple(reqs)


def matches(selector: Selector, labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in selector)


def from_label_selector_object(obj: Mapping[str, Any] | None, where: str) -> Selector:
    """A metav1.LabelSelector (matchLabels + matchExpressions) as requirements; None/{} matches all."""
    if not obj:
        return ()
    reqs = [Requirement(k, IN, frozenset({str(v)})) for k, v in (obj.get("matchLabels") or {}).items()]
    for n, expr in enumerate(obj.get("matchExpressions") or []):
        op = expr.get("operator")
        values = frozenset(str(v) for v in (expr.get("values") or []))
        if op not in (IN, NOT_IN, EXISTS, NOT_EXISTS):
            raise ValueError(f"{where}.matchExpressions[{n}].operator: Unsupported value: {op!r}")
        if op in (IN, NOT_IN) and not values:
            raise ValueError(f"{where}.matchExpressions[{n}].values: Required value: must be specified for {op}")
        if op in (EXISTS, NOT_EXISTS) and values:
            raise ValueError(f"{where}.matchExpressions[{n}].values: Forbidden: may not be specified for {op}")
        reqs.append(Requirement(str(expr.get("key", "")), op, values))
    return tuple(reqs)


# Field selectors: (path, wanted value, equal?) — only the fields the real API server supports.
FieldSelector = tuple[tuple[str, str, bool], ...]

COMMON_FIELDS = ("metadata.name", "metadata.namespace")
EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "Service": ("spec.clusterIP", "spec.type"),
    "Namespace": ("status.phase",),
    "EndpointSlice": ("addressType",),
    # kube-apiserver's event fields (kubectl describe selects on involvedObject.*)
    "Event": ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
              "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
              "reason", "reportingComponent", "source", "type"),
}
# field selector name -> where the value is, when they differ
FIELD_PATHS: dict[str, str] = {"source": "source.component"}


def parse_field_selector(text: str | None, kind: str) -> FieldSelector:
    if not text or not text.strip():
        return ()
    allowed = COMMON_FIELDS + EXTRA_FIELDS.get(kind, ())
    out: list[tuple[str, str, bool]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([A-Za-z.]+)\s*(==|!=|=)\s*(\S*)\s*", part)
        if not m:
            raise ApiError(400, f"invalid field selector {text!r}: cannot parse {part!r}")
        path, op, value = m.groups()
        if path not in allowed:
            raise ApiError(400, f'field label not supported: {path} (supported for {kind}: {", ".join(allowed)})')
        out.append((path, value, op != "!="))
    return tuple(out)


def _field(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in FIELD_PATHS.get(path, path).split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return "" if cur is None else str(cur)


def field_matches(selector: FieldSelector, obj: Mapping[str, Any]) -> bool:
    return all((_field(obj, path) == value) == equal for path, value, equal in selector)


def object_filter(label_sel: Selector, field_sel: FieldSelector) -> Callable[[Mapping[str, Any]], bool]:
    """One predicate for list and watch filtering."""

    def accept(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels")
        return matches(label_sel, labels) and field_matches(field_sel, obj)

    return accept
