"""Logging set-up shared by gunicorn (``logconfig_dict``) and the CLI.

- ``proxy_app.access``: one JSON line per request, to stdout, message only.
- ``proxy_app.debug``: ``--detailed_debug`` request traces (DEBUG), to stderr.
- ``proxy_app`` and gunicorn's own loggers: start-up, config and error lines, to stderr.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from gunicorn.glogging import Logger as GunicornLogger


class LineHandler(logging.Handler):
    """Writes each record as one line with one ``os.write``, taking no lock.

    A StreamHandler holds its lock across write() and flush(), and while one thread sits in
    that system call every other thread finishing a request queues on the lock. A single
    write of one line to a pipe, a file opened for append or a terminal is not interleaved
    with another (POSIX: up to PIPE_BUF bytes for pipes; access lines are far shorter).
    """

    def __init__(self, fd: int = 1):
        super().__init__()
        self.fd = fd

    def createLock(self):  # noqa: N802 - logging's name
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)

    def writes_bare_messages(self) -> bool:
        formatter = self.formatter
        return not self.filters and (formatter is None or formatter._fmt == "%(message)s")


def log_line(logger: logging.Logger, line: str) -> None:
    """Log ``line`` at INFO; straight to the file descriptor when nothing else would happen.

    With the production config (one LineHandler, message only, no filters) building a
    LogRecord, finding the caller and formatting the record cost more than writing the
    line itself (about 5 us a request on the access log); the bytes written are the same.
    """
    handlers = logger.handlers
    if (
        len(handlers) == 1
        and type(handlers[0]) is LineHandler
        and not logger.filters
        and handlers[0].level <= logging.INFO
        and handlers[0].writes_bare_messages()
    ):
        try:
            os.write(handlers[0].fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # as logging.raiseExceptions = False would: never break a request
    else:
        logger.info(line)


class QuietAccessLogger(GunicornLogger):
    """gunicorn's logger without its access line.

    With a ``logconfig_dict`` gunicorn builds every access line (formatting a dozen atoms)
    even when its logger discards it; the proxy writes its own line at body end.
    """

    def access(self, resp, req, environ, request_time):
        return None


def logging_config(level: str = "info", detailed_debug: bool = False) -> dict:
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"},
            "json_line": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"()": "proxy_app.logs.LineHandler", "formatter": "json_line", "fd": 1},
        },
        # gunicorn merges this dict over its defaults key by key, so root and both of its
        # loggers are spelled out (its default root handler is not defined here).
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            # The proxy writes its own access line (at body end, no query string); gunicorn's
            # is switched off (QuietAccessLogger) and this logger is silent too.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "proxy_app": {"level": level, "handlers": ["stderr"], "propagate": False},
            "proxy_app.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
            "proxy_app.debug": {"level": "DEBUG" if detailed_debug else "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class Throttle:
    """Lets a repeated log line through at most once per ``every`` seconds (monotonic clock,
    thread-safe): an outage is logged once a minute, not once per failed call."""

    def __init__(self, every: float = 60.0):
        self.every = every
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True (and the clock restarts) if the line may be logged now."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.every:
                return False
            self._last = now
            return True

    def reset(self) -> None:
        """The trouble is over: the next occurrence is logged at once."""
        self._last = None
