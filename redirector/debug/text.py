"""The debug answers as aligned text tables, for people on the node (``?format=text``, ``Accept:
text/plain``, ``lightpath-redirector debug <endpoint>``). Pure: bodies in, text out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

Renderer = Callable[[Mapping[str, Any]], str]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart; empty cells show as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def fields(body: Mapping[str, Any], prefix: str = "") -> str:
    """Nested mappings as ``name  value`` lines (dotted names); lists joined by commas."""
    rows = list(_flatten(body, prefix))
    width = max((len(name) for name, _ in rows), default=0)
    return "".join(f"{name.ljust(width)}  {value}\n" for name, value in rows)


def _flatten(body: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in body.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                rows += _flatten(item, f"{name}[{i}].")
        else:
            rows.append((name, _cell(value)))
    return rows


def _cell(value: object) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("\n", " ")


def _next(body: Mapping[str, Any], shown: int, total: int, what: str) -> str:
    token = body.get("continue")
    more = f"; next page: continue={token}" if token else ""
    return f"({shown} of {total} {what}{more})\n"


def services_text(body: Mapping[str, Any]) -> str:
    rows: list[list[object]] = []
    errors: list[str] = []
    for svc in body.get("services", []):
        ns, name = svc["namespace"], svc["name"]
        for e in svc["entries"]:
            rows.append([ns, name, e["owner"].rsplit(":", 1)[-1] if e["owner"] else "", e["kind"], "TCP",
                         f"ipv{e['family']}", e["key"]])
        for u in svc["unserved"]:
            rows.append([ns, name, u["port_name"], "UNSERVED", u["protocol"], "", f"port {u['port']}"])
        if svc.get("error"):
            errors.append(f"error {ns}/{name}: {svc['error']}")
    out = table(["NAMESPACE", "NAME", "PORT", "KIND", "PROTO", "FAMILY", "REDIRECTED KEY"], rows)
    out += "".join(f"{line}\n" for line in errors)
    return out + _next(body, len(body.get("services", [])), body.get("total_services", 0), "Services")


def rules_text(body: Mapping[str, Any]) -> str:
    kernel = dict(body.get("kernel") or {})
    blocks = {k: kernel.pop(k) for k in ("ruleset", "rules") if k in kernel}
    out = fields(kernel)
    ruleset = blocks.get("ruleset")
    if isinstance(ruleset, str) and ruleset.strip():
        out += "\n" + ruleset.rstrip() + "\n"
    rules = blocks.get("rules")
    if isinstance(rules, Mapping):
        for family, lines in rules.items():
            out += f"\n# {family}\n" + "".join(f"{line}\n" for line in lines or [])
    for path, n in (body.get("truncated") or {}).items():
        out += f"(list {path} cut: {n} items, see the entries below)\n"
    rows = [[f"ipv{e['family']}", e["match"], e["key"], e["owner"]] for e in body.get("entries", [])]
    out += "\n" + table(["FAMILY", "MATCH", "KEY (in the kernel)", "OWNER (desired state)"], rows)
    return out + _next(body, len(body.get("entries", [])), body.get("total", 0), "kernel entries")


def diff_text(body: Mapping[str, Any]) -> str:
    if body.get("in_sync"):
        return "in sync: the kernel holds exactly the desired entries\n"
    rows = [["missing", f"ipv{e['family']}", e["match"], e["key"], e["owner"]] for e in body.get("missing", [])]
    rows += [["extra", f"ipv{e['family']}", e["match"], e["key"], e["owner"]] for e in body.get("extra", [])]
    out = table(["STATE", "FAMILY", "MATCH", "KEY", "OWNER"], rows)
    return out + (f"({body.get('missing_total', 0)} missing from the kernel, "
                  f"{body.get('extra_total', 0)} extra in it)\n")


def render(endpoint: str, body: Mapping[str, Any]) -> str:
    """The text form of ``endpoint``'s JSON body."""
    return RENDERERS.get(endpoint, fields)(body)


def proxy_text(body: Mapping[str, Any]) -> str:
    out = [f"node {body.get('node')}: {body.get('services_served')} Services served by Envoy of "
           f"{body.get('services_known')} known; revision {body.get('revision')}; "
           f"in sync: {_cell(body.get('in_sync'))}; redirects waiting for Envoy: {body.get('gated_entries', 0)}\n"]
    for stream in body.get("streams", []):
        types = stream.get("types", {})
        parts = [f"{t} acked={v.get('acked')} nacks={v.get('nacks')} refused={v.get('refused')}" for t, v in types.items()]
        out.append(f"stream {stream.get('peer')} node={stream.get('node')} in_sync={_cell(stream.get('in_sync'))}: "
                   + "; ".join(parts) + "\n")
    if not body.get("streams"):
        out.append("no Envoy connected\n")
    handover = body.get("handover") or {}
    if handover.get("prepared") or handover.get("held"):
        out.append(f"handover: prepared {_cell(handover.get('prepared'))}; held for kube-proxy "
                   f"{_cell([f'{k} {v}s' for k, v in (handover.get('held') or {}).items()])}\n")
    rows: list[list[object]] = []
    # --preserve-source-ip: whether each key's backend sees the client's address ("kept") or the node's
    source = any("client_address" in key for svc in body.get("services", []) for key in svc.get("keys", []))
    for svc in body.get("services", []):
        for key in svc.get("keys", []):
            rows.append([svc["service"], key["key"], key["chain"], key["endpoints"], key["acked"], key["served"],
                         *([key.get("client_address", "")] if source else []), key["refused"]])
        for problem in svc.get("problems", []):
            rows.append([svc["service"], "", "", "", "", "", *([""] if source else []), problem])
    headers = ["SERVICE", "KEY", "CHAIN", "ENDPOINTS", "ACKED", "SERVED", *(["CLIENT ADDRESS"] if source else []),
               "REFUSED / PROBLEM"]
    out.append("\n" + table(headers, rows))
    if body.get("truncated"):
        out.append("(more Services: use --limit or ?service=namespace/name)\n")
    return "".join(out)


RENDERERS: dict[str, Renderer] = {
    "proxy": proxy_text,
    "services": services_text,
    "rules": rules_text,
    "diff": diff_text,
}
