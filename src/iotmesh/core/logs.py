"""Log output: readable text for a terminal, or one JSON object per line for machines.

A JSON line has `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`,
`service` and `instance` (this process's id, as in run.json and on /metrics), and when
they apply `trace_id` / `span_id` (the current OpenTelemetry span, so a log line can be
found from its trace and the other way round), `exc` (the formatted exception) and
`stack`. Log aggregators (Loki, Elasticsearch, CloudWatch) read these fields without a
parsing rule.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import msgspec
from opentelemetry import trace

from iotmesh.core.ids import SERVICE_NAME, instance_id

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object (no newline inside: exceptions are escaped)."""

    def __init__(self, service: str, instance: str | None = None) -> None:
        super().__init__()
        self.service = service
        self.instance = instance if instance is not None else instance_id()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        """UTC with milliseconds: `2026-11-27T12:00:00.123Z`."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "instance": self.instance,
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            doc["trace_id"] = f"{span.trace_id:032x}"
            doc["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _encoder.encode(doc).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(
    level: str, log_format: Literal["text", "json"] = "text", service: str = SERVICE_NAME
) -> None:
    """Send log records of `level` and above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hypercorn logs every lifespan/connection detail at INFO; keep ours readable.
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))
    # aiocoap logs every 2.31 Continue and error answer at INFO: one line per request.
    logging.getLogger("iotmesh.coap.aiocoap").setLevel(max(logging.WARNING, root.level))


def json_log_identity() -> tuple[str, str] | None:
    """(service, instance) of the JSON formatter the root logger uses, None if it logs
    text: a child process (the SQLite writer) is told to log the same way."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return handler.formatter.service, handler.formatter.instance
    return None
