"""shared.logs: one JSON object per line, extra fields as keys, third-party loggers adopted or quietened."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from shared.logs import JsonFormatter, configure


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() rewires the root logger: put back what pytest had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    touched = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                      logging.getLogger(name).propagate) for name in ("lp-adopted", "lp-chatty")}
    yield
    root.handlers[:], root.level = handlers, level
    for name, (hs, lvl, prop) in touched.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = hs, lvl, prop


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lightpath.test", logging.INFO, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    return record


def test_a_line_has_the_fixed_keys_then_the_extra_fields() -> None:
    line = JsonFormatter().format(_record("synced", namespaces=3))
    doc = json.loads(line)
    assert "\n" not in line
    assert list(doc)[:4] == ["time", "level", "logger", "msg"]
    assert doc["level"] == "INFO" and doc["logger"] == "lightpath.test" and doc["msg"] == "synced"
    assert doc["namespaces"] == 3 and doc["time"].endswith("Z")


def test_fields_may_use_any_name_and_uvicorns_colour_copy_is_dropped() -> None:
    doc = json.loads(JsonFormatter().format(_record("admission", fields={"name": "web", "uid": "u1"},
                                                    color_message="\x1b[1madmission\x1b[0m")))
    assert doc["name"] == "web" and doc["uid"] == "u1"
    assert "fields" not in doc and "color_message" not in doc


def test_an_exception_is_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    doc = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_configure_adopts_loggers_and_sets_thresholds() -> None:
    out = io.StringIO()
    adopted = logging.getLogger("lp-adopted")
    adopted.addHandler(logging.StreamHandler(io.StringIO()))
    adopted.propagate = False
    configure("DEBUG", out, adopt=("lp-adopted",), levels={"lp-chatty": logging.ERROR})
    adopted.info("through ours")
    logging.getLogger("lp-chatty").warning("quietened")
    logging.getLogger("lp-chatty").error("kept")
    msgs = [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
    assert msgs == ["through ours", "kept"]
    assert adopted.handlers == [] and logging.getLogger().level == logging.DEBUG
