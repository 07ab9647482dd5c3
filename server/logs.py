"""Log lines that name their request: a call sets its request id (and, with tracing on, its
trace id) in context variables, and a filter stamps both on every record logged while the call
runs, so one grep finds all a request did. ``log_format = "json"`` writes one JSON object per
line for log collectors. No OpenTelemetry here."""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from datetime import UTC, datetime

REQUEST_ID: ContextVar[str | None] = ContextVar("odeserve_request_id", default=None)
TRACE_ID: ContextVar[str | None] = ContextVar("odeserve_trace_id", default=None)
MAX_REQUEST_ID = 256
"""Characters of a client-chosen request id the server takes (the OIP ``id``'s own bound)."""
LOG_FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def usable_request_id(value: str | None) -> str | None:
    """``value`` when it may name a request in logs, spans and response metadata: 1 to
    ``MAX_REQUEST_ID`` printable ASCII characters (nothing that could forge a log line or be
    refused as gRPC metadata); else None."""
    if value and len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return None


def new_request_id() -> str:
    """A request id for a call that brought none: 128 random bits in hex (``uuid4().hex``
    takes seven times as long)."""
    return os.urandom(16).hex()


class RequestContext(logging.Filter):
    """Stamps ``request_id`` and ``trace_id`` (None outside a call) on every record a handler
    emits; on a handler, so records of every logger get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.trace_id = TRACE_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The classic line, with `` request_id=… trace_id=…`` appended when known."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = "".join(
            f" {key}={value}" for key in ("request_id", "trace_id") if (value := getattr(record, key, None))
        )
        if not context:
            return line
        head, newline, rest = line.partition("\n")  # before a traceback, if any
        return head + context + newline + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` and ``trace_id`` when known, ``exception`` with its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` (``text`` or ``json``) with request context."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    stream = logging.StreamHandler()
    stream.addFilter(RequestContext())
    stream.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return stream


def configure(level: str, log_format: str) -> None:
    """The process's logging: every record to stderr in ``log_format``."""
    logging.basicConfig(level=level, handlers=[handler(log_format)])
