"""Server logging: the logger handed to aiohttp's HTTP server, and JSON log lines.

`http_server_logger`: malformed request heads become one short line. aiohttp logs each
request head it cannot parse (over-long lines, bad syntax) at ERROR with
a traceback whose message quotes up to 100 bytes of the offending line, which may be an
`Authorization` header. This logger keeps the record (who, what kind of error) and drops
the quoted bytes; other records pass unchanged.

`use_json_logs` (`server.log_format: json`): every record one JSON object on stdout.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson
from aiohttp.http_exceptions import HttpProcessingError


class _DropQuotedHead(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request head from %s (%s, status %s)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def http_server_logger() -> logging.Logger:
    """`sluice.http`: pass as `logger=` to aiohttp's AppRunner."""
    logger = logging.getLogger("sluice.http")
    if not any(isinstance(f, _DropQuotedHead) for f in logger.filters):
        logger.addFilter(_DropQuotedHead())
    return logger


class JsonFormatter(logging.Formatter):
    """One JSON object per record, keyed like the access log: ts, level, event, logger.

    A traceback rides in `exception` as one string, so a record is always one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, tz=UTC)
        line: dict[str, object] = {
            "ts": when.isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line).decode()


def use_json_logs() -> None:
    """Every log record (ours, aiohttp's, warnings) as a JSON line on stdout, the stream the
    access log writes to."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)
