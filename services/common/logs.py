"""JSON logs, one line per record, carrying the request id of the request being served."""
from __future__ import annotations

import logging
import sys

from flask import g, has_app_context
from pythonjsonlogger.json import JsonFormatter


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = getattr(g, "request_id", None) if has_app_context() else None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Install the JSON handler on the root logger once per process."""
    root = logging.getLogger()
    if any(getattr(handler, "_dispatcher", False) for handler in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._dispatcher = True
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    ))
    root.addHandler(handler)
    root.setLevel(level)
