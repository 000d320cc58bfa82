"""Per-Service traffic figures from Envoy's own counters (admin ``/stats``), for ``/debug/proxy``.

The shell fetches lazily (only when someone asks) and keeps the answer a few seconds, so a busy debug
endpoint never turns into load on Envoy's admin; the parsing is pure. Counters are cumulative since Envoy
started: a rate is the difference of two readings over their interval (that is what operators' scrapers do).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Per cluster (alt_stat_name = the Service port): the request and connection figures an operator compares.
FIGURES = ("upstream_rq_total", "upstream_rq_2xx", "upstream_rq_4xx", "upstream_rq_5xx", "upstream_rq_retry",
           "upstream_rq_retry_success", "upstream_rq_timeout", "upstream_rq_per_try_timeout",
           "upstream_rq_pending_overflow", "upstream_cx_total",
           "upstream_cx_active", "upstream_cx_connect_fail", "outlier_detection.ejections_active")
# Request latency (histogram ``upstream_rq_time``, ms): p50 and p99 of Envoy's last stats interval (5 s),
# kept as integer microseconds under ``<name>.p50_us`` / ``.p99_us``; absent when that interval saw no request.
LATENCY = "upstream_rq_time"
QUANTILES = {"P50": "p50_us", "P99": "p99_us"}
FILTER = r"^cluster\.[^.]+\.(" + "|".join(f.replace(".", r"\.") for f in (*FIGURES, LATENCY)) + ")$"
_QUANTILE = re.compile(r"\b(P\d+(?:\.\d+)?)\(([^,()]+),([^,()]+)\)")


def parse(text: str) -> dict[str, int]:
    """``name: value`` lines -> integers; a histogram line (``name: P0(interval,cumulative) P25(...) ...``)
    -> its interval p50/p99 in µs. Anything else is skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        if value.isdigit():
            out[name.strip()] = int(value)
        elif value.startswith("P0("):
            for quantile, interval, _cumulative in _QUANTILE.findall(value):
                key = QUANTILES.get(quantile)
                if key is None:
                    continue
                try:
                    ms = float(interval)
                except ValueError:
                    continue
                if ms == ms and ms >= 0:  # nan: no request in the interval
                    out[f"{name.strip()}.{key}"] = int(ms * 1000)
    return out


def latency(stats: Mapping[str, int], stat_name: str) -> dict[str, int]:
    """The latency figures present for one cluster (``p50_us``, ``p99_us``)."""
    prefix = f"cluster.{stat_name}.{LATENCY}."
    return {key: stats[prefix + key] for key in QUANTILES.values() if prefix + key in stats}


def figures(stats: Mapping[str, int], stat_name: str) -> dict[str, int]:
    prefix = f"cluster.{stat_name}."
    out = {f: stats.get(prefix + f, 0) for f in FIGURES}
    out.update({f"{LATENCY}.{k}": v for k, v in latency(stats, stat_name).items()})
    return out


def port_of(stat_name: str) -> tuple[str, str, str] | None:
    """(namespace, service, port) from ``controlplane.translate.stat_name`` (Kubernetes names hold no '_')."""
    parts = stat_name.split("_")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], parts[2]


def used_services(stats: Mapping[str, int]) -> list[tuple[str, list[str]]]:
    """(sid, stat names) of the Services Envoy has traffic counters for, in name order (pure).

    WHY from the counters and not from every Service the agent knows: the bootstrap makes Envoy create a
    cluster's traffic counters on its first use, so this is the handful of Services used since Envoy
    started, whatever the node holds; walking 10,000 Services per Lease write held the control plane's
    lock and the GIL long enough to delay on-demand cluster fetches by ~80 ms (docs/performance.md).
    Outlier-detection gauges exist from a cluster's creation and do not count as use."""
    names: dict[str, set[str]] = {}
    for key in stats:
        if not key.startswith("cluster."):
            continue
        stat, _, figure = key[8:].partition(".")
        if not figure.startswith("upstream_"):
            continue
        labels = port_of(stat)
        if labels is not None:
            names.setdefault(f"{labels[0]}/{labels[1]}", set()).add(stat)
    return [(sid, sorted(found)) for sid, found in sorted(names.items())]


Admins = Callable[[], list[tuple[str, int]]]


class EnvoyStats:
    """Envoy's counters, fetched on demand and kept ``ttl`` seconds. ``admin``: one (host, port), or a
    function naming every Envoy admin on the node (two during a rollout: their counters are added, which
    gives the node's totals)."""

    def __init__(self, admin: tuple[str, int] | Admins, ttl: float = 3.0, timeout: float = 1.0) -> None:
        self.admins: Admins = (lambda: [admin]) if isinstance(admin, tuple) else admin
        self.ttl, self.timeout = ttl, timeout
        self._lock = threading.Lock()
        self._at = -1e9
        self._stats: dict[str, int] | None = None
        self._error = "not fetched yet"

    @staticmethod
    def url(admin: tuple[str, int]) -> str:
        host, port = admin
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/stats?filter={urllib.parse.quote(FILTER)}"

    def snapshot(self, cached: bool = True) -> tuple[dict[str, int] | None, str]:
        """(counters, "") or (None, why they are unavailable). ``cached=False``: a fresh read that leaves the
        cache alone (the agent's Lease reads every few seconds; the debug view must not get its older copy)."""
        if not cached:
            return self._fetch()
        with self._lock:
            # A failed read is kept briefly only: Envoy may just be starting (the agent's Lease asks early).
            if time.monotonic() - self._at < (self.ttl if self._stats is not None else min(self.ttl, 0.5)):
                return self._stats, self._error
            self._stats, self._error = self._fetch()
            self._at = time.monotonic()
            return self._stats, self._error

    def _fetch(self) -> tuple[dict[str, int] | None, str]:
        try:
            admins = self.admins()
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the debug endpoint
            return None, f"cannot look for Envoy's admin: {type(exc).__name__}: {str(exc)[:200]}"
        if not admins:
            return None, "no Envoy admin found on this node"
        total: dict[str, int] = {}
        errors: list[str] = []
        for admin in admins:
            try:
                with urllib.request.urlopen(self.url(admin), timeout=self.timeout) as resp:  # noqa: S310 - loopback
                    for name, value in parse(resp.read().decode(errors="replace")).items():
                        # two Envoys (a rollout): counters add up, a percentile is not additive (the worse)
                        total[name] = max(total.get(name, 0), value) if name.endswith("_us") else total.get(name, 0) + value
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(f"{admin[0]}:{admin[1]}: {type(exc).__name__}: {str(exc)[:200]}")
        if len(errors) == len(admins):
            return None, "; ".join(errors)
        return total, ""


def per_key(stats: dict[str, int] | None, error: str, stat_names: Iterable[str]) -> list[dict[str, Any] | str]:
    """One entry per stat name: its figures, or "unavailable: <why>"."""
    if stats is None:
        return [f"unavailable: {error}" for _ in stat_names]
    return [figures(stats, name) for name in stat_names]
