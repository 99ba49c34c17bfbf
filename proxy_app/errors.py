"""Errors the proxy makes itself, as the LiteLLM-shaped JSON envelope (SPEC §5).

A message never contains a configured header value, the master key or a caller's key:
every message below is a fixed sentence or names only paths, methods and field names.

Upstream failures before the response began (urllib3's exceptions, translated the way
``requests.adapters.HTTPAdapter.send`` does) map as:

- connect timeout (``MaxRetryError`` from ``ConnectTimeoutError``), ``ReadTimeoutError`` -> 504
- refused or unresolvable (``NewConnectionError``), TLS (``SSLError``), reset or closed
  (``ProtocolError``, ``OSError``), any other ``urllib3.exceptions.HTTPError``          -> 502
"""

from __future__ import annotations

import json

from flask import Response
from flask import request

from urllib3.exceptions import ConnectTimeoutError
from urllib3.exceptions import MaxRetryError
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError
from urllib3.exceptions import SSLError

from proxy_app.body import close_after_response
from proxy_app.body import drain
from proxy_app.body import has_body


def error_response(status: int, message: str, kind: str, headers: list[tuple[str, str]] = ()) -> Response:
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        separators=(",", ":"),
    )
    return Response(body, status=status, headers=list(headers), content_type="application/json")


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


def upstream_error_kind(exc: Exception) -> str:
    """Name an upstream failure (before the response began) for logs and metrics."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # NewConnectionError subclasses ConnectTimeoutError (urllib3 compatibility): test it first.
    if isinstance(exc, NewConnectionError):
        return "connection_error"
    if isinstance(exc, ConnectTimeoutError):
        return "connect_timeout"
    if isinstance(exc, ReadTimeoutError):
        return "read_timeout"
    if isinstance(exc, SSLError):
        return "tls_error"
    if isinstance(exc, (ProtocolError, OSError)):
        return "connection_error"
    return "protocol_error"


def upstream_error_response(exc: Exception, call_id: str) -> tuple[Response, str]:
    """The 502/504 answer for an upstream that failed before its response began."""
    kind = upstream_error_kind(exc)
    headers = [("x-litellm-call-id", call_id)]
    if kind in ("connect_timeout", "read_timeout"):
        return error_response(504, "The upstream did not answer within the timeout.", "upstream_timeout", headers), kind
    message = "The upstream could not be reached or sent an invalid response."
    return error_response(502, message, "upstream_error", headers), kind


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
