"""Prometheus metrics, correct across gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (proxy_app/gunicorn_conf.py sets it before any worker
starts) every worker writes its samples to files in that directory and ``/metrics``
merges them, so a scrape that lands on any worker sees the sum over all of them
(prometheus/client_python "multiprocess mode"). Without it (tests, a single process) the
default registry is served.

The environment variable must be set before this module is imported: prometheus_client
chooses its value storage at import time. If it was imported earlier, every worker counts
in its own memory while ``/metrics`` reads the (empty) directory and answers an empty 200;
:func:`storage_problem` detects that and the app logs it as an ERROR, at start-up or at the
first scrape that finds it.
"""

from __future__ import annotations

import logging
import os

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import REGISTRY
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import generate_latest
from prometheus_client import multiprocess
from prometheus_client import values

log = logging.getLogger("proxy_app")

# Seconds; LLM calls range from milliseconds (rerank) to minutes (long streams).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("proxy_requests_total", "Requests answered, by route, method and status.", ["route", "method", "status"])
DURATION = Histogram(
    "proxy_request_duration_seconds", "Time from request to the end of the response body.", ["route"], buckets=DURATION_BUCKETS
)
TTFB = Histogram("proxy_upstream_ttfb_seconds", "Time from request to the upstream's response head.", ["route"], buckets=DURATION_BUCKETS)
REQUEST_BYTES = Counter("proxy_request_bytes_total", "Request body bytes read from callers.", ["route"])
RESPONSE_BYTES = Counter("proxy_response_bytes_total", "Response body bytes written to callers.", ["route"])
UPSTREAM_ERRORS = Counter("proxy_upstream_errors_total", "Upstream failures, by kind.", ["route", "kind"])
IN_FLIGHT = Gauge("proxy_streams_in_flight", "Upstream responses being relayed now.", ["route"], multiprocess_mode="livesum")
# The stores (proxy_app/store.py, limiter.py, usage.py): store is "database" or "redis".
STORE_ERRORS = Counter("proxy_store_errors_total", "Failed store operations, by store and operation.", ["store", "operation"])
USAGE_ROWS_WRITTEN = Counter("proxy_usage_rows_written_total", "Usage rows written to the database.")
USAGE_ROWS_HELD = Gauge(
    "proxy_usage_rows_held", "Usage rows waiting to be written (in memory or spooled on disk).", multiprocess_mode="livesum"
)
USAGE_ROWS_DROPPED = Counter("proxy_usage_rows_dropped_total", "Usage rows lost because the local spool was full.")
LIMITER_FALLBACK = Counter(
    "proxy_limiter_local_fallback_total", "Limit checks made with the worker's own counters because Redis was unreachable."
)
KEY_REFUSALS = Counter("proxy_key_refusals_total", "Requests refused by a virtual key check, by reason.", ["reason"])


# Methods outside this set are counted as OTHER: a caller must not be able to create
# label values (and so time series) at will.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class RouteMetrics:
    """The labelled series of one route, resolved once (``labels()`` takes a lock and
    builds a key on every call)."""

    __slots__ = ("duration", "ttfb", "request_bytes", "response_bytes", "in_flight", "route", "_requests", "_errors")

    def __init__(self, route: str):
        self.route = route
        self.duration = DURATION.labels(route)
        self.ttfb = TTFB.labels(route)
        self.request_bytes = REQUEST_BYTES.labels(route)
        self.response_bytes = RESPONSE_BYTES.labels(route)
        self.in_flight = IN_FLIGHT.labels(route)
        self._requests = {}
        self._errors = {}

    def requests(self, method: str, status: int):
        key = (method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = REQUESTS.labels(
                self.route, method if method in KNOWN_METHODS else "OTHER", str(status)
            )
        return child

    def errors(self, kind: str):
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = UPSTREAM_ERRORS.labels(self.route, kind)
        return child


_by_route: dict[str, RouteMetrics] = {}


def for_route(route: str) -> RouteMetrics:
    metrics = _by_route.get(route)
    if metrics is None:
        metrics = _by_route[route] = RouteMetrics(route)
    return metrics


def registry():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    return REGISTRY


def storage_problem(environ=os.environ, value_class=None) -> str | None:
    """Why /metrics would be wrong in this process, or None.

    ``value_class`` is the storage prometheus_client chose when it was imported
    (``prometheus_client.values.ValueClass``): :class:`values.MutexValue` means in-process
    memory, anything else the multiprocess files.
    """
    in_memory = (values.ValueClass if value_class is None else value_class) is values.MutexValue
    if environ.get("PROMETHEUS_MULTIPROC_DIR") and in_memory:
        return (
            "metrics: PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before it was, "
            "so each worker counts in its own memory and /metrics reports nothing; "
            "set the variable before anything imports proxy_app.factory or proxy_app.metrics"
        )
    return None


def _log_storage_problem() -> bool:
    problem = storage_problem()
    if problem:
        log.error("%s", problem)
    return problem is not None


def init_app(app) -> None:
    checked = [_log_storage_problem()]

    def metrics():
        if not checked[0]:
            # The variable may have been set after start-up (gunicorn --preload).
            checked[0] = _log_storage_problem()
        return Response(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])


def _forget_after_fork() -> None:
    # The children hold values bound to the parent's pid files (multiprocess mode).
    _by_route.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def mark_worker_dead(pid: int) -> None:
    """gunicorn ``child_exit`` hook: drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
