"""Per-Service traffic figures from Envoy's own counters (admin ``/stats``), for ``/debug/proxy``.

The shell fetches lazily (only when someone asks) and keeps the answer a few seconds, so a busy debug
endpoint never turns into load on Envoy's admin; the parsing is pure. Counters are cumulative since Envoy
started: a rate is the difference of two readings over their interval (that is what operators' scrapers do).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Per cluster (alt_stat_name = the Service port): the request and connection figures an operator compares.
FIGURES = ("upstream_rq_total", "upstream_rq_2xx", "upstream_rq_4xx", "upstream_rq_5xx", "upstream_rq_retry",
           "upstream_rq_retry_success", "upstream_rq_timeout", "upstream_rq_pending_overflow", "upstream_cx_total",
           "upstream_cx_active", "upstream_cx_connect_fail", "outlier_detection.ejections_active")
FILTER = r"^cluster\.[^.]+\.(" + "|".join(f.replace(".", r"\.") for f in FIGURES) + ")$"


def parse(text: str) -> dict[str, int]:
    """``name: value`` lines -> integers (histograms and non-numeric lines skipped)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def figures(stats: Mapping[str, int], stat_name: str) -> dict[str, int]:
    prefix = f"cluster.{stat_name}."
    return {f: stats.get(prefix + f, 0) for f in FIGURES}


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

    def snapshot(self) -> tuple[dict[str, int] | None, str]:
        """(counters, "") or (None, why they are unavailable)."""
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
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
                        total[name] = total.get(name, 0) + value
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
