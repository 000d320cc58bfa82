"""Per-Service L7 options from annotations, as the original Lightpath named them. Pure, stdlib only, never raises.

``config.lightpath.cloud/<port-name>-<option>`` sets an option for one port, ``config.lightpath.cloud/<option>``
for every port of the Service (the per-port form wins). Defaults are the original Lightpath's, so a Lightpath
user's Services keep behaving as they did. Every value is checked against bounds Envoy accepts: a bad value
is a *problem* (reported per Service by the agent, a warning by the webhook) and the default is used, so no
annotation can make Envoy refuse a configuration. The webhook and the control plane call this same parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from shared import constants as c

PREFIX = "config.lightpath.cloud/"
Protocol = Literal["tcp", "http", "h2c"]
# How Envoy speaks to a port, by appProtocol (the lists live in shared.constants, shared with the CLI).
HTTP1_APP_PROTOCOLS = c.HTTP1_APP_PROTOCOLS
H2C_APP_PROTOCOLS = c.H2C_APP_PROTOCOLS


def upstream_protocol(app_protocol: object) -> Protocol:
    if not isinstance(app_protocol, str):
        return "tcp"
    value = app_protocol.strip().lower()
    return "http" if value in HTTP1_APP_PROTOCOLS else "h2c" if value in H2C_APP_PROTOCOLS else "tcp"
LbPolicy = Literal["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "RING_HASH", "MAGLEV"]
LB_POLICIES: tuple[LbPolicy, ...] = ("LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "RING_HASH", "MAGLEV")
# Envoy's router retry conditions (HTTP and gRPC); anything else is refused here, not by Envoy.
RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited", "retriable-4xx",
    "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure",
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
MAX_DURATION_MS = 86_400_000  # 24 h: longer is a typo, not a timeout
MAX_COUNT = 4_294_967_295  # Envoy's uint32 thresholds
MAX_RETRIES = 100
MAX_TEXT = 256  # longer values are refused before parsing (and never echoed in full)


@dataclass(frozen=True, slots=True)
class Breaker:
    """One priority's circuit-breaker thresholds (Envoy's defaults)."""

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    track_remaining: bool = False


@dataclass(frozen=True, slots=True)
class Outlier:
    interval_ms: int = 10_000
    base_ejection_ms: int = 30_000
    max_ejection_ms: int = 300_000
    max_ejection_percent: int = 10
    consecutive_5xx: int = 5  # HTTP ports only
    consecutive_gateway_failure: int = 5  # TCP ports: consecutive connection failures


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """What goes on a key's cluster (TCP and HTTP ports)."""

    connect_timeout_ms: int = 5_000
    lb_policy: LbPolicy = "LEAST_REQUEST"
    default_priority: Breaker = Breaker()
    high_priority: Breaker = Breaker()
    outlier: Outlier = Outlier()
    upstream_idle_timeout_ms: int | None = None  # HTTP ports only (15 s there); 0: none
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """What goes on a key's HTTP route. 0 ms: no timeout."""

    timeout_ms: int = 15_000
    per_try_timeout_ms: int = 5_000
    idle_timeout_ms: int = 300_000
    retry_enabled: bool = True
    retry_on: str = "5xx,reset,retriable-headers"
    num_retries: int = 2


HTTP_CLUSTER_DEFAULT = ClusterOptions(upstream_idle_timeout_ms=15_000)
TCP_CLUSTER_DEFAULT = ClusterOptions()
DEFAULT_ROUTE = RouteOptions()


@dataclass(frozen=True, slots=True)
class PortOptions:
    cluster: ClusterOptions
    route: RouteOptions | None  # None: a TCP port


@dataclass(frozen=True, slots=True)
class Parsed:
    ports: tuple[tuple[str, PortOptions], ...] = ()  # (port name, options) in the Service's port order
    problems: tuple[str, ...] = field(default=())

    def of(self, port_name: str) -> PortOptions | None:
        return dict(self.ports).get(port_name)


# -- value parsers: text -> value, or Invalid(why) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Invalid:
    why: str


_DURATION = re.compile(r"^([0-9]{1,12})(?:\.([0-9]{1,3}))?(ms|s|m|h)?$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}


def duration_ms(text: str, *, allow_zero: bool) -> int | Invalid:
    """"5s", "300ms", "1m", "1h", "1.5s", bare seconds ("5") -> milliseconds; else why not."""
    value = text.strip().lower()
    if value.startswith("-"):
        return Invalid("is negative")
    m = _DURATION.match(value)
    if m is None:
        return Invalid("is not a duration (examples: 5s, 300ms, 1m, 5)")
    whole, frac, unit = m.groups()
    scale = _UNIT_MS[unit]
    ms = int(whole) * scale + (int(frac.ljust(3, "0")) * scale // 1000 if frac else 0)
    if frac and unit == "ms":
        return Invalid("is not a whole number of milliseconds")
    if ms == 0 and not allow_zero:
        return Invalid("must be more than 0")
    if ms > MAX_DURATION_MS:
        return Invalid("is more than 24h")
    return ms


def count(text: str, *, low: int, high: int) -> int | Invalid:
    value = text.strip()
    if value.startswith("-"):
        return Invalid("is negative")
    if not value.isdigit() or not value.isascii():
        return Invalid("is not a whole number")
    number = int(value)
    if number < low:
        return Invalid(f"must be at least {low}")
    if number > high:
        return Invalid(f"is more than {high}")
    return number


def boolean(text: str) -> bool | Invalid:
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    return Invalid("is not true or false")


def lb_policy(text: str) -> LbPolicy | Invalid:
    value = text.strip().upper().replace("-", "_")
    for policy in LB_POLICIES:
        if value == policy:
            return policy
    return Invalid(f"is not one of {', '.join(LB_POLICIES)}")


def retry_on(text: str) -> str | Invalid:
    tokens = [t.strip().lower() for t in text.split(",")]
    if not tokens or any(not t for t in tokens):
        return Invalid("is empty or has an empty condition")
    unknown = [t for t in tokens if t not in RETRY_ON]
    if unknown:
        return Invalid(f"has unknown conditions ({', '.join(unknown)[:40]})")
    return ",".join(dict.fromkeys(tokens))


# -- the options ----------------------------------------------------------------------------------------

Target = Literal["cluster", "route", "default", "high", "outlier"]


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    target: Target
    attr: str
    kind: Literal["duration", "duration0", "count", "count0", "percent", "bool", "lb", "retry_on", "retries"]
    http_only: bool = False


def _breakers() -> list[Option]:
    out = []
    priorities: tuple[Literal["default", "high"], ...] = ("default", "high")
    for priority in priorities:
        for what in ("connections", "pending-requests", "requests", "retries"):
            out.append(Option(f"circuit-breaker-{priority}-max-{what}", priority, f"max_{what.replace('-', '_')}",
                              "count0" if what == "retries" else "count"))
        out.append(Option(f"circuit-breaker-{priority}-track-remaining", priority, "track_remaining", "bool"))
    return out


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("idle-timeout", "route", "idle_timeout_ms", "duration0", http_only=True),
    Option("request-timeout", "route", "timeout_ms", "duration0", http_only=True),
    Option("upstream-request-timeout", "route", "per_try_timeout_ms", "duration0", http_only=True),
    Option("retry-enabled", "route", "retry_enabled", "bool", http_only=True),
    Option("retry-on", "route", "retry_on", "retry_on", http_only=True),
    Option("num-retries", "route", "num_retries", "retries", http_only=True),
    Option("upstream-idle-timeout", "cluster", "upstream_idle_timeout_ms", "duration0", http_only=True),
    Option("upstream-connect-timeout", "cluster", "connect_timeout_ms", "duration"),
    Option("lb-policy", "cluster", "lb_policy", "lb"),
    Option("access-log", "cluster", "access_log", "bool"),
    *_breakers(),
    Option("outlier-detection-interval", "outlier", "interval_ms", "duration"),
    Option("outlier-detection-base-ejection-time", "outlier", "base_ejection_ms", "duration"),
    Option("outlier-detection-max-ejection-time", "outlier", "max_ejection_ms", "duration"),
    Option("outlier-detection-max-ejection-percent", "outlier", "max_ejection_percent", "percent"),
    # A TCP port has no responses: its outlier detection counts connection failures (consecutive-gateway-failure).
    Option("outlier-detection-consecutive-5xx", "outlier", "consecutive_5xx", "count", http_only=True),
    Option("outlier-detection-consecutive-gateway-failure", "outlier", "consecutive_gateway_failure", "count"),
]}
_BY_LENGTH = sorted(OPTIONS, key=len, reverse=True)  # "retry-on" must not shadow a longer name ending like it


def _value(option: Option, text: str) -> object:
    kind = option.kind
    if kind in ("duration", "duration0"):
        return duration_ms(text, allow_zero=kind == "duration0")
    if kind == "count":
        return count(text, low=1, high=MAX_COUNT)
    if kind == "count0":
        return count(text, low=0, high=MAX_COUNT)
    if kind == "percent":
        return count(text, low=0, high=100)
    if kind == "retries":
        return count(text, low=0, high=MAX_RETRIES)
    if kind == "bool":
        return boolean(text)
    if kind == "lb":
        return lb_policy(text)
    return retry_on(text)


def _split(suffix: str) -> tuple[str | None, Option | None]:
    """"http-num-retries" -> ("http", num-retries); "num-retries" -> (None, num-retries); unknown -> (?, None)."""
    if suffix in OPTIONS:
        return None, OPTIONS[suffix]
    for name in _BY_LENGTH:
        if suffix.endswith("-" + name) and len(suffix) > len(name) + 1:
            return suffix[: -len(name) - 1], OPTIONS[name]
    return suffix, None


def _short(text: str, limit: int = 40) -> str:
    clean = "".join(ch if ch.isprintable() and ch.isascii() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


def parse(annotations: object, ports: Iterable[tuple[str, bool]]) -> Parsed:
    """``annotations`` of a Service, its ``ports`` as (name, is HTTP) -> options per port and the problems."""
    ports = list(ports)
    names = {name for name, _ in ports}
    problems: list[str] = []
    wide: dict[Option, object] = {}
    per_port: dict[str, dict[Option, object]] = {}
    items = sorted(annotations.items(), key=lambda kv: str(kv[0])) if isinstance(annotations, Mapping) else []
    for key, raw in items:
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        suffix = key[len(PREFIX):]
        label = PREFIX + _short(suffix, 80)
        port, option = _split(suffix)
        if option is None:
            problems.append(f"{label}: unknown option: ignored")
            continue
        if port is not None and port not in names:
            problems.append(f"{label}: no port is named {_short(port, 30)!r}: ignored")
            continue
        if not isinstance(raw, str) or len(raw) > MAX_TEXT:
            problems.append(f"{label}: value is not a short text: default used")
            continue
        value = _value(option, raw)
        if isinstance(value, Invalid):
            problems.append(f"{label}: {_short(raw)!r} {value.why}: default used")
            continue
        if port is None:
            wide[option] = value
            continue
        if option.http_only and not dict(ports).get(port, False):
            if option.name == "idle-timeout":
                problems.append(f"{label}: not applied: a TCP port's idle timeout is node-wide (docs/l7.md)")
            elif option.target == "outlier":
                problems.append(f"{label}: applies to HTTP ports only (TCP ports: consecutive-gateway-failure, "
                                "counting connection failures): ignored")
            else:
                problems.append(f"{label}: applies to HTTP ports only: ignored")
            continue
        per_port.setdefault(port, {})[option] = value
    if not wide and not per_port and not problems:
        return _defaults(tuple(ports))
    out: list[tuple[str, PortOptions]] = []
    for name, http in ports:
        chosen = {**wide, **per_port.get(name, {})}
        opts, more = _build(chosen, http, PREFIX + (f"{name}-" if name else ""))
        problems.extend(more)
        out.append((name, opts))
    return Parsed(tuple(out), tuple(dict.fromkeys(problems)))


def _defaults(ports: tuple[tuple[str, bool], ...]) -> Parsed:
    """The options of a Service without (valid) annotations, one shared object per port layout: nearly every
    Service has one of a few layouts, and 10,000 copies of the defaults cost ~2 MiB (issue 11)."""
    found = _DEFAULTS.get(ports)
    if found is None:
        if len(_DEFAULTS) > _DEFAULTS_MAX:
            _DEFAULTS.clear()
        found = _DEFAULTS[ports] = Parsed(tuple((name, _build({}, http, "")[0]) for name, http in ports))
    return found


_DEFAULTS: dict[tuple[tuple[str, bool], ...], Parsed] = {}
_DEFAULTS_MAX = 10_000


def check_service(service: object) -> tuple[str, ...]:
    """The problems of a Service's annotations (the webhook's warnings): the same parse as the agent's."""
    if not isinstance(service, Mapping):
        return ()
    meta, spec = service.get("metadata"), service.get("spec")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    if not isinstance(annotations, Mapping) or not any(isinstance(k, str) and k.startswith(PREFIX) for k in annotations):
        return ()
    raw_ports = spec.get("ports") if isinstance(spec, Mapping) else None
    ports = []
    for port in raw_ports if isinstance(raw_ports, list) else []:
        if isinstance(port, Mapping):
            name = port.get("name")
            ports.append((name if isinstance(name, str) else "", upstream_protocol(port.get("appProtocol")) != "tcp"))
    return parse(annotations, ports).problems


def _build(chosen: Mapping[Option, object], http: bool, label: str) -> tuple[PortOptions, list[str]]:
    cluster = HTTP_CLUSTER_DEFAULT if http else TCP_CLUSTER_DEFAULT
    route = DEFAULT_ROUTE if http else None
    groups: dict[Target, dict[str, object]] = {}
    for option, value in chosen.items():
        if option.http_only and not http:
            continue
        groups.setdefault(option.target, {})[option.attr] = value
    problems: list[str] = []
    if "default" in groups:
        cluster = replace(cluster, default_priority=replace(cluster.default_priority, **groups["default"]))  # type: ignore[arg-type]
    if "high" in groups:
        cluster = replace(cluster, high_priority=replace(cluster.high_priority, **groups["high"]))  # type: ignore[arg-type]
    if "outlier" in groups:
        outlier = replace(cluster.outlier, **groups["outlier"])  # type: ignore[arg-type]
        if outlier.max_ejection_ms < outlier.base_ejection_ms:  # Envoy refuses that pair
            problems.append(f"{label}outlier-detection-max-ejection-time: less than the base ejection time: "
                            "the base ejection time used")
            outlier = replace(outlier, max_ejection_ms=outlier.base_ejection_ms)
        cluster = replace(cluster, outlier=outlier)
    if "cluster" in groups:
        cluster = replace(cluster, **groups["cluster"])  # type: ignore[arg-type]
    if route is not None and "route" in groups:
        route = replace(route, **groups["route"])  # type: ignore[arg-type]
    return PortOptions(cluster, route), problems
