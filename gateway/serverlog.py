"""The logger handed to aiohttp's HTTP server: malformed request heads become one short line.

aiohttp logs each request head it cannot parse (over-long lines, bad syntax) at ERROR with
a traceback whose message quotes up to 100 bytes of the offending line, which may be an
`Authorization` header. This logger keeps the record (who, what kind of error) and drops
the quoted bytes; other records pass unchanged.
"""

from __future__ import annotations

import logging

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
