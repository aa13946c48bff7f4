"""Logging set-up shared by both daemons and the CLI."""

from __future__ import annotations

import json
import logging
import os
import sys

from opentelemetry import trace


class TraceContextFilter(logging.Filter):
    """Adds the current trace and span ids to every record emitted inside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
            record.trace_suffix = f" [trace={record.trace_id} span={record.span_id}]"
        else:
            record.trace_id = record.span_id = ""
            record.trace_suffix = ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"] = record.trace_id
            entry["span_id"] = record.span_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str | None = None, *, json_format: bool | None = None) -> None:
    level = (level or os.environ.get("EDGEFLEET_LOG_LEVEL", "INFO")).upper()
    if json_format is None:
        json_format = os.environ.get("EDGEFLEET_LOG_FORMAT", "text") == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(trace_suffix)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
