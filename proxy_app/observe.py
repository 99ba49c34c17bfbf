"""Per-request accounting when the body is done: the access line, the metrics, the usage row.

:class:`AccessLog` wraps the WSGI app. It counts request bytes read and response bytes
written, and, when the server closes the response (after the last byte of a stream, or
when the caller went away), writes one line to the ``proxy_app.access`` logger and updates
the metrics. The forwarding view fills in what only it knows (route, call id, cost,
time to first upstream byte, upstream error) on the :class:`Record` it finds in the environ.

A caller that goes away before the whole body was written is logged and counted with
status 499, whatever status had been sent.

It is also where a virtual key's concurrency slot is given back (whatever ended the
response: its last byte, the caller leaving, an upstream failure) and where each
pass-through request's usage row is queued for the database (proxy_app/usage.py).

The line never holds a header value, a key, a query string or a body.
"""

from __future__ import annotations

import json
import logging
import time

from proxy_app import metrics
from proxy_app.logs import log_line
from proxy_app.urls import raw_request_target
from proxy_app.urls import split_request_target
from proxy_app.usage import Row
from proxy_app.usage import spend_of

access_log = logging.getLogger("proxy_app.access")
RECORD_KEY = "proxy_app.record"
# The status logged and counted for a caller that left before the response ended (nginx's
# and Caddy's "client closed request").
CALLER_GONE = 499
_to_json = json.JSONEncoder(separators=(",", ":")).encode


class Record:
    """What is known about one request; the view fills in the pass-through fields."""

    __slots__ = (
        "started", "route", "call_id", "cost", "ttfb", "error", "status", "streaming", "request_bytes", "response_bytes", "body_done",
        "wall_start", "api_key", "key_alias", "lease", "answer_headers", "response_cost",
    )

    def __init__(self, started: float):
        self.started = started
        self.wall_start = time.time()
        # Who called (a key's token, MASTER, or None) and the limiter slot its key holds.
        self.api_key = None
        self.key_alias = None
        self.lease = None
        # Headers added to a relayed answer (x-ratelimit-*), and the upstream's cost header.
        self.answer_headers = None
        self.response_cost = None
        self.route = None
        self.call_id = None
        self.cost = None
        self.ttfb = None
        self.error = None
        self.status = 0
        self.streaming = False
        self.request_bytes = 0
        self.response_bytes = 0
        # The server took the whole response body; see _CountedBody.close.
        self.body_done = False

    def stream_started(self) -> None:
        self.streaming = True
        metrics.for_route(self.route or "").in_flight.inc()


class CountingInput:
    """wsgi.input that counts the bytes the proxy reads from the caller."""

    __slots__ = ("_stream", "_record")

    def __init__(self, stream, record: Record):
        self._stream = stream
        self._record = record

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._record.request_bytes += len(data)
        return data


class AccessLog:
    """WSGI middleware: account for every request when its response is closed.

    :param usage: where pass-through usage rows go (``add(row)``), or None.
    :param release: gives a virtual key's limiter slot back (``release(lease)``), or None.
    """

    def __init__(self, app, usage=None, release=None):
        self.app = app
        self.usage = usage
        self.release = release

    def __call__(self, environ, start_response):
        record = Record(time.perf_counter())
        environ[RECORD_KEY] = record
        environ["wsgi.input"] = CountingInput(environ["wsgi.input"], record)

        def start(status, headers, exc_info=None):
            record.status = int(status[:3])
            return start_response(status, headers, exc_info)

        return _CountedBody(self.app(environ, start), record, environ, self)


class _CountedBody:
    __slots__ = ("_body", "_record", "_environ", "_log")

    def __init__(self, body, record: Record, environ, log: AccessLog):
        self._body = body
        self._record = record
        self._environ = environ
        self._log = log

    def __iter__(self):
        record = self._record
        try:
            for chunk in self._body:
                record.response_bytes += len(chunk)
                yield chunk
        except Exception as exc:
            record.error = record.error or f"aborted: {type(exc).__name__}"
            raise
        record.body_done = True

    def close(self) -> None:
        record = self._record
        if not record.body_done and record.error is None:
            # The server stopped taking the body without an error of the proxy's or the
            # upstream's: the caller went away (gunicorn's write failed). Logged and counted
            # as 499, as Caddy and nginx do, so it never looks like a clean end.
            record.status = CALLER_GONE
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            record = self._record
            if record.lease is not None:
                # First: the slot must come back even if accounting below fails.
                self._log.release(record.lease)
                record.lease = None
            duration = finish(record, self._environ)
            if record.route is not None and self._log.usage is not None:
                self._log.usage.add(usage_row(record, self._environ, duration))


_second = [0, ""]


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds; the date-and-second part is formatted once a second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}+00:00"


def usage_row(record: Record, environ, duration: float) -> Row:
    """The spend_logs row of a finished pass-through request (proxy_app/schema.py), each
    value of its column's type (the writer does not check a Row again)."""
    # Spend only for calls the upstream answered: a refused or failed call cost nothing.
    spend = spend_of(record.response_cost, record.cost or 0.0) if record.ttfb is not None else 0.0
    return Row(
        request_id=record.call_id,
        api_key=record.api_key,
        key_alias=record.key_alias,
        route=record.route,
        method=environ.get("REQUEST_METHOD", ""),
        status=record.status,
        request_bytes=record.request_bytes,
        response_bytes=record.response_bytes,
        duration_ms=round(duration * 1000, 3),
        ttfb_ms=None if record.ttfb is None else round(record.ttfb * 1000, 3),
        spend=spend,
        start_time=record.wall_start,
        end_time=record.wall_start + duration,
        upstream_error=record.error,
    )


def finish(record: Record, environ) -> float:
    """Log and count a finished request; its duration in seconds."""
    duration = time.perf_counter() - record.started
    route = metrics.for_route(record.route or "")
    method = environ.get("REQUEST_METHOD", "")
    route.requests(method, record.status).inc()
    route.duration.observe(duration)
    if record.request_bytes:
        route.request_bytes.inc(record.request_bytes)
    if record.response_bytes:
        route.response_bytes.inc(record.response_bytes)
    if record.ttfb is not None:
        route.ttfb.observe(record.ttfb)
    if record.error:
        route.errors(record.error.split(":", 1)[0]).inc()
    if record.streaming:
        route.in_flight.dec()
    if access_log.isEnabledFor(logging.INFO):
        log_line(
            access_log,
            _to_json(
                {
                    "time": utc_timestamp(),
                    "method": method,
                    "path": split_request_target(raw_request_target(environ))[0],
                    "route": record.route,
                    "status": record.status,
                    "request_bytes": record.request_bytes,
                    "response_bytes": record.response_bytes,
                    "duration_ms": round(duration * 1000, 3),
                    "ttfb_ms": None if record.ttfb is None else round(record.ttfb * 1000, 3),
                    "call_id": record.call_id,
                    "cost_per_request": record.cost,
                    "upstream_error": record.error,
                }
            ),
        )
    return duration
