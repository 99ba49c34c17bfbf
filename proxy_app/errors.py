"""Errors the proxy makes itself, as the LiteLLM-shaped JSON envelope.

A message never contains a configured header value, the master key or a caller's key:
every message below is a fixed sentence or names only paths, methods and field names.

An upstream that fails before its response began is answered 502 or 504 with a message
that names the class of failure (:data:`UPSTREAM_FAILURES`), the same class goes into
the access line's ``upstream_error`` and the ``proxy_upstream_errors_total`` metric, and
one WARNING names the endpoint, the target host and the cause (forward.py).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass

from flask import Response
from flask import request
from urllib3 import exceptions as urllib3_exceptions

from proxy_app.body import close_after_response
from proxy_app.body import drain
from proxy_app.body import has_body
from proxy_app.wire import UnparsableHead


def error_response(status: int, message: str, kind: str, headers: list[tuple[str, str]] = ()) -> Response:
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        separators=(",", ":"),
    )
    return Response(body, status=status, headers=list(headers), content_type="application/json")


class Refusal(Exception):
    """A request the proxy answers itself, before anything is sent upstream."""

    # The virtual key refused, when it was a known one (for the usage row).
    api_key: str | None = None
    key_alias: str | None = None

    def __init__(self, status: int, message: str, kind: str, headers: list[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


NOT_FOUND = "No pass-through endpoint is configured for this path."
METHOD_NOT_ALLOWED = "Method not allowed on this path."


def settle_body(environ, response: Response) -> Response:
    """Before a proxy-made answer: read off an unread request body, or close after it."""
    if has_body(environ) and not drain(environ):
        close_after_response(environ, response)
    return response


def refuse(environ, status: int, message: str, kind: str, headers: list[tuple[str, str]] = ()) -> Response:
    """A proxy-made error answer to the request in ``environ``, its unread body settled."""
    return settle_body(environ, error_response(status, message, kind, headers))


@dataclass(frozen=True)
class UpstreamFailure:
    kind: str  # the access line's upstream_error and the metric's label
    status: int
    message: str


# kind -> (status, what the caller is told). Timeouts are 504, everything else 502.
UPSTREAM_FAILURES = {
    "dns_error": (502, "The proxy could not resolve the upstream host."),
    "connection_refused": (502, "The upstream refused the connection."),
    "connection_error": (502, "The proxy could not connect to the upstream."),
    "connect_timeout": (504, "The upstream did not accept the connection within the timeout."),
    "tls_untrusted": (502, "The upstream's TLS certificate is not trusted."),
    "tls_error": (502, "The TLS handshake with the upstream failed."),
    "connection_reset": (502, "The upstream closed the connection before answering."),
    "read_timeout": (504, "The upstream did not answer within the timeout."),
    "invalid_response": (502, "The upstream sent a response head that cannot be relayed."),
    "protocol_error": (502, "The upstream sent an invalid response."),
}


def causes(exc: BaseException, limit: int = 8) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first.

    requests wraps urllib3's exceptions (in ``args[0]``), urllib3 wraps the socket's or
    http.client's (``MaxRetryError.reason``, ``ProtocolError.args[1]``, ``__cause__``,
    ``__context__``).
    """
    chain: list[BaseException] = []
    todo = [exc]
    while todo and len(chain) < limit:
        current = todo.pop(0)
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.extend(arg for arg in current.args if isinstance(arg, BaseException))
        todo.extend((current.__cause__, current.__context__))
    return chain


def failure_kind(chain: list[BaseException]) -> str:
    """Classify an upstream failure from its chain of causes (see :func:`causes`)."""

    def has(*types) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(UnparsableHead):
        return "invalid_response"
    if has(socket.gaierror):
        return "dns_error"
    if has(ssl.SSLCertVerificationError):
        return "tls_untrusted"
    if has(ssl.SSLError, urllib3_exceptions.SSLError):
        return "tls_error"
    if has(ConnectionRefusedError):
        return "connection_refused"
    if has(urllib3_exceptions.ReadTimeoutError):
        return "read_timeout"
    # NewConnectionError subclasses ConnectTimeoutError (urllib3 compatibility): a refused
    # or unreachable connect is one, a timed-out connect is a ConnectTimeoutError alone.
    if has(urllib3_exceptions.NewConnectionError):
        return "connection_error"
    if has(urllib3_exceptions.ConnectTimeoutError, TimeoutError):
        return "connect_timeout"
    if has(ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected, urllib3_exceptions.ProtocolError):
        return "connection_reset"
    if has(OSError):
        return "connection_error"
    return "protocol_error"


def describe_cause(chain: list[BaseException]) -> str:
    """The innermost cause in words, for the log: no URL (it may hold a secret), no value."""
    for exc in reversed(chain):
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {exc.verify_message}"
        if isinstance(exc, OSError) and (exc.strerror or exc.args):
            # A socket-level error: no URL in it ("Connection refused", "timed out").
            return exc.strerror or str(exc)
        if isinstance(exc, (http.client.HTTPException, ssl.SSLError)):
            return f"{type(exc).__name__}: {exc}"
    return type(chain[-1]).__name__


def failure_of(kind: str) -> UpstreamFailure:
    status, message = UPSTREAM_FAILURES[kind]
    return UpstreamFailure(kind, status, message)


def upstream_failure(exc: BaseException) -> UpstreamFailure:
    return failure_of(failure_kind(causes(exc)))


def upstream_error_response(failure: UpstreamFailure, call_id: str) -> Response:
    """The 502/504 answer for an upstream that failed before its response began."""
    kind = "upstream_timeout" if failure.status == 504 else "upstream_error"
    return error_response(failure.status, failure.message, kind, [("x-litellm-call-id", call_id)])


def init_app(app) -> None:
    """Answer Flask's own 404/405/400 in the same JSON envelope."""

    @app.errorhandler(404)
    def not_found(_exc):
        return refuse(request.environ, 404, NOT_FOUND, "not_found_error")

    @app.errorhandler(405)
    def method_not_allowed(exc):
        allow = ", ".join(sorted(exc.valid_methods or ()))
        return refuse(request.environ, 405, METHOD_NOT_ALLOWED, "method_not_allowed", [("Allow", allow)])

    @app.errorhandler(400)
    def bad_request(_exc):
        return refuse(request.environ, 400, "Malformed request.", "invalid_request_error")
