"""Structured logs: one JSON object per line, so a log pipeline can filter on uid, decision, reason."""

from __future__ import annotations

import json
import logging
import sys
import time
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


def configure(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route our loggers and uvicorn's through one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # One line per admission is ours; uvicorn's access line would only repeat it without the decision.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
