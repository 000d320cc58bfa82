"""The three PATCH dialects: JSON Patch (RFC 6902), JSON Merge Patch (RFC 7386), strategic merge.

WHY: admission webhooks answer with JSON Patches and controllers/CLIs send merge patches; the double
must apply both exactly as specified so a wrong patch fails here as it would on a cluster.

Strategic merge patch is SIMPLIFIED: it is a merge patch, except that lists of objects with a known
merge key (`ports` by `port`, `ownerReferences` by `uid`, `conditions` by `type`, `containers`/`volumes`
by `name`) are merged element by element, and an element `{"<key>": ..., "$patch": "delete"}` removes
the matching element. Other lists are replaced whole. `$retainKeys`, `$setElementOrder` and
`$deleteFromPrimitiveList` are not implemented.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from sandbox.api.errors import ApiError

MERGE_KEYS: dict[str, str] = {
    "ports": "port",
    "ownerReferences": "uid",
    "conditions": "type",
    "containers": "name",
    "volumes": "name",
}


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {pointer!r}: must start with '/'")
    return [_unescape(t) for t in pointer[1:].split("/")]


def _index(container: list[Any], token: str, pointer: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise ApiError(422, f"invalid array index {token!r} in JSON pointer {pointer!r}")
    idx = int(token)
    limit = len(container) if for_add else len(container) - 1
    if idx > limit:
        raise ApiError(422, f"array index {idx} out of bounds in JSON pointer {pointer!r}")
    return idx


def _parent(doc: Any, pointer: str) -> tuple[Any, str]:
    tokens = _split(pointer)
    if not tokens:
        raise ApiError(422, "JSON patch operation on the whole document is not supported")
    cur = doc
    for tok in tokens[:-1]:
        if isinstance(cur, dict):
            if tok not in cur:
                raise ApiError(422, f"JSON patch path {pointer!r}: missing key {tok!r}")
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_index(cur, tok, pointer, for_add=False)]
        else:
            raise ApiError(422, f"JSON patch path {pointer!r}: cannot descend into a scalar")
    return cur, tokens[-1]


def _get(doc: Any, pointer: str) -> Any:
    cur = doc
    for tok in _split(pointer):
        if isinstance(cur, dict) and tok in cur:
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_index(cur, tok, pointer, for_add=False)]
        else:
            raise ApiError(422, f"JSON patch path {pointer!r} does not exist")
    return cur


def _add(doc: Any, pointer: str, value: Any) -> None:
    parent, tok = _parent(doc, pointer)
    if isinstance(parent, dict):
        parent[tok] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, tok, pointer, for_add=True), value)
    else:
        raise ApiError(422, f"JSON patch add at {pointer!r}: parent is not an object or array")


def _remove(doc: Any, pointer: str) -> Any:
    parent, tok = _parent(doc, pointer)
    if isinstance(parent, dict):
        if tok not in parent:
            raise ApiError(422, f"JSON patch remove: path {pointer!r} does not exist")
        return parent.pop(tok)
    if isinstance(parent, list):
        return parent.pop(_index(parent, tok, pointer, for_add=False))
    raise ApiError(422, f"JSON patch remove at {pointer!r}: parent is not an object or array")


def apply_json_patch(doc: Any, ops: Any) -> Any:
    """Apply RFC 6902 operations to a copy of `doc`; 400 if malformed, 422 if an operation fails."""
    if not isinstance(ops, list):
        raise ApiError(400, "a JSON patch must be a JSON array of operations")
    out = copy.deepcopy(doc)
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, f"JSON patch operation {n} must be an object with 'op' and 'path'")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise ApiError(400, f"JSON patch operation {n} ({kind}) needs a 'value'")
        if kind in ("move", "copy") and "from" not in op:
            raise ApiError(400, f"JSON patch operation {n} ({kind}) needs a 'from'")
        if kind == "add":
            _add(out, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(out, path)
        elif kind == "replace":
            _get(out, path)  # must exist
            parent, tok = _parent(out, path)
            if isinstance(parent, list):
                parent[_index(parent, tok, path, for_add=False)] = copy.deepcopy(op["value"])
            else:
                parent[tok] = copy.deepcopy(op["value"])
        elif kind == "move":
            _add(out, path, _remove(out, op["from"]))
        elif kind == "copy":
            _add(out, path, copy.deepcopy(_get(out, op["from"])))
        elif kind == "test":
            if _get(out, path) != op["value"]:
                raise ApiError(422, f"JSON patch test failed at {path!r}")
        else:
            raise ApiError(400, f"JSON patch operation {n}: unknown op {kind!r}")
    return out


def apply_merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def _merge_list(old: list[Any], patch: list[Any], key: str) -> list[Any]:
    if not all(isinstance(e, dict) and key in e for e in patch) or not all(isinstance(e, dict) for e in old):
        return [copy.deepcopy(e) for e in patch if not (isinstance(e, dict) and e.get("$patch"))]
    out = [copy.deepcopy(e) for e in old]
    for elem in patch:
        at = next((i for i, e in enumerate(out) if e.get(key) == elem[key]), None)
        if elem.get("$patch") == "delete":
            if at is not None:
                out.pop(at)
        elif at is None:
            out.append(copy.deepcopy(elem))
        else:
            out[at] = apply_strategic_merge_patch(out[at], elem)
    return out


def apply_strategic_merge_patch(doc: Any, patch: Any) -> Any:
    """The simplified strategic merge patch described in the module docstring."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
        else:
            out[key] = apply_strategic_merge_patch(out.get(key), value)
    return out


def apply_patch(doc: dict[str, Any], content_type: str, body: bytes) -> Any:
    """Dispatch on the PATCH Content-Type (415 for apply patches and anything unknown)."""
    try:
        patch = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the patch body is not valid JSON: {exc}") from exc
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json-patch+json":
        return apply_json_patch(doc, patch)
    if not isinstance(patch, dict):
        raise ApiError(400, f"a {ctype} patch must be a JSON object")
    if ctype == "application/merge-patch+json":
        return apply_merge_patch(doc, patch)
    if ctype == "application/strategic-merge-patch+json":
        return apply_strategic_merge_patch(doc, patch)
    raise ApiError(
        415,
        f"the body of the request was in an unknown format ({ctype or 'none'}); accepted: "
        "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json",
        reason="UnsupportedMediaType",
    )
