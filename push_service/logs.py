"""Logging: one JSON object per line (default) or plain text for humans."""

from __future__ import annotations

import logging
import sys
import time

import orjson
from aiohttp.http_exceptions import HttpProcessingError

# LogRecord attributes that are not ours: everything else passed in `extra=` is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{key}={value}" for key, value in record.__dict__.items() if key not in _STANDARD)
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += f" [{extras}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse at error level, with a traceback whose message quotes the
    offending raw line: a client token in the URL or a publish key in an Authorization header would reach
    the logs. Such a record becomes one line without the quote: a client error, logged as http_refused is."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("aiohttp.") and isinstance(error, HttpProcessingError):
            record.msg, record.args = "malformed request refused", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.event, record.status, record.error = "http_malformed", error.code, type(error).__name__
            return logging.getLogger().isEnabledFor(logging.INFO)  # as if logged at info in the first place
        return True


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(MalformedRequestFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is off (it costs per request); its errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
