"""Structured logs for every component: one JSON object per line on stderr, so a log pipeline can filter
on fields (uid, decision, reason, error, ...) instead of parsing prose.

WHY one module: the webhook and the redirector must emit the same line shape; the components differ only
in which third-party loggers they adopt or quieten, which they pass to ``configure``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is emitted as a field.
# "color_message" is uvicorn's ANSI-coloured copy of msg: noise in a JSON line.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """``{"time": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}``.

    Extra fields come from ``extra={...}`` (names must not clash with LogRecord attributes) or,
    for any name, from ``extra={"fields": {...}}``.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key == "fields" and isinstance(value, dict):
                out.update(value)  # ``extra={"fields": {...}}`` may use any key, "name" included
            elif key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    adopt: Iterable[str] = (),
    levels: Mapping[str, int] | None = None,
) -> None:
    """One JSON handler on the root logger (``stream``, default stderr) at ``level``.

    ``adopt``: loggers that bring their own handlers (uvicorn's); theirs are dropped so their records reach
    ours. ``levels``: per-logger thresholds for chatty libraries, e.g. ``{"urllib3": logging.ERROR}``.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in adopt:
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    for name, threshold in (levels or {}).items():
        logging.getLogger(name).setLevel(threshold)
