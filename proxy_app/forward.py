"""The request lifecycle of one pass-through call, top to bottom.

    check the proxy key -> build the upstream URL -> build the headers -> open the
    upstream request (body streamed) -> relay status, headers and body as they arrive

Everything per-endpoint was prepared at start-up (see config.Endpoint); the rules are
pure functions in urls.py and headers.py; here they are only put in order.
"""

from __future__ import annotations

import errno
import time
import uuid

import requests
import urllib3
from flask import Response
from flask import request

from proxy_app.auth import key_carriers
from proxy_app.config import Endpoint
from proxy_app.config import Settings
from proxy_app.debug import debug_request
from proxy_app.debug import debug_response
from proxy_app.errors import error_response
from proxy_app.errors import upstream_error_response
from proxy_app.headers import caller_headers
from proxy_app.headers import outbound_headers
from proxy_app.headers import response_headers
from proxy_app.observe import RECORD_KEY
from proxy_app.upstream import CHUNK_SIZE
from proxy_app.upstream import IncompleteRequestBody
from proxy_app.upstream import LengthLimitedBody
from proxy_app.upstream import Transport
from proxy_app.upstream import chunked_body
from proxy_app.urls import build_query
from proxy_app.urls import has_dot_segment
from proxy_app.urls import join_path
from proxy_app.urls import split_request_target
from proxy_app.urls import subpath_rest
from proxy_app.urls import upstream_url


class RelayResponse(Response):
    # Werkzeug would invent "Content-Type: text/html" for an upstream answer that had none.
    default_mimetype = None


class UpstreamAborted(ConnectionResetError):
    """The upstream failed after the response began.

    The only honest signal left is to abort the caller's connection, so the caller sees a
    truncated response, never a clean short one (Go's ReverseProxy panics with
    ErrAbortHandler for the same reason, golang/go#23643). It is a ConnectionResetError so
    that gunicorn closes the socket without writing the final chunk and without logging
    a traceback (gthread ``handle`` treats ECONNRESET as routine).
    """

    def __init__(self, cause: str):
        super().__init__(errno.ECONNRESET, f"upstream failed mid-body: {cause}")


class Forwarder:
    """Forwards the current Flask request to an endpoint's target and relays the answer."""

    def __init__(self, settings: Settings, transport: Transport, detailed_debug: bool = False):
        self.master_key = settings.master_key.encode() if settings.master_key else None
        self.transport = transport
        self.debug = detailed_debug

    def __call__(self, endpoint: Endpoint, subpath: bool) -> Response:
        environ = request.environ
        call_id = str(uuid.uuid4())
        record = environ[RECORD_KEY]
        record.route = endpoint.path
        record.call_id = call_id
        record.cost = endpoint.cost_per_request
        carriers = key_carriers(environ, self.master_key, endpoint.key_header)
        if endpoint.auth and not carriers:
            return unauthorized(environ, endpoint, call_id)

        raw_path, caller_query = split_request_target(raw_request_target(environ))
        path = endpoint.target_path
        if subpath:
            rest = subpath_rest(raw_path, endpoint.path)
            if rest is None:
                return error_response(404, "No pass-through endpoint is configured for this path.", "not_found_error")
            if has_dot_segment(rest):
                return error_response(400, "Dot segments ('.', '..') are not allowed in the path.", "invalid_request_error")
            path = join_path(endpoint.target_path, rest)
        query = build_query(caller_query, endpoint.target_query, endpoint.merge_query_params, endpoint.default_query_params)
        url = upstream_url(endpoint.origin, path, query)

        consumed = carriers | {endpoint.key_header} if endpoint.key_header else carriers
        headers = outbound_headers(
            caller_headers(environ),
            endpoint.headers,
            endpoint.configured_names,
            endpoint.forward_headers,
            environ.get("REMOTE_ADDR"),
            consumed,
        )
        body = request_body(environ, headers)
        if body is False:
            return error_response(400, "Invalid Content-Length.", "invalid_request_error")

        if self.debug:
            shown_path = "/***" if endpoint.target_is_secret else path
            debug_request(call_id, request.method, endpoint.origin, shown_path, query, headers)
        try:
            upstream = self.transport.send(request.method, url, headers, body, endpoint.timeout)
        except IncompleteRequestBody:
            record.error = "incomplete_request_body"
            return error_response(400, "The request body ended before its Content-Length.", "invalid_request_error")
        except requests.RequestException as exc:
            response, record.error = upstream_error_response(exc, call_id)
            return response
        record.ttfb = time.perf_counter() - record.started
        if self.debug:
            debug_response(call_id, upstream.raw)
        record.stream_started()
        return relay(upstream, call_id)


def raw_request_target(environ) -> str:
    """The request-target as the caller sent it, still percent-encoded.

    gunicorn sets RAW_URI, Werkzeug's servers REQUEST_URI; PATH_INFO is already decoded.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    query = environ.get("QUERY_STRING")
    path = environ.get("PATH_INFO", "/").encode("latin-1").decode("latin-1")
    return f"{path}?{query}" if query else path


def request_body(environ, headers: list[tuple[str, str]]):
    """The body to stream upstream, adding the framing header that describes it.

    Content-Length is kept when the caller sent one; a chunked upload is forwarded chunked
    (urllib3 adds Transfer-Encoding itself); never both (RFC 9112 §6.1). ``False`` means
    the Content-Length was invalid.
    """
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        if not length.isdigit():
            return False
        headers.append(("Content-Length", length))
        return LengthLimitedBody(stream, int(length)) if int(length) else None
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower() and environ.get("wsgi.input_terminated"):
        return chunked_body(stream)
    return None


def unauthorized(environ, endpoint: Endpoint, call_id: str) -> Response:
    presented = environ.get("HTTP_AUTHORIZATION") or environ.get("HTTP_X_LITELLM_API_KEY") or (
        endpoint.key_header and environ.get("HTTP_" + endpoint.key_header.upper().replace("-", "_"))
    )
    message = "Authentication Error, invalid proxy key." if presented else "Authentication Error, No api key passed in."
    return error_response(401, message, "auth_error", [("x-litellm-call-id", call_id)])


def relay(upstream: requests.Response, call_id: str) -> Response:
    """Relay the upstream status line, headers and body exactly, streaming the body."""
    raw = upstream.raw
    headers = response_headers(raw.headers.items())
    headers.append(("x-litellm-call-id", call_id))
    if "text/event-stream" in raw.headers.get("content-type", ""):
        # nginx honours (and hides) this, so the stream is not buffered on the way out.
        headers.append(("X-Accel-Buffering", "no"))
    status = f"{raw.status} {raw.reason}" if raw.reason else raw.status
    response = RelayResponse(relay_body(raw), status=status, headers=headers)
    # Closes the upstream connection when the caller left early (or the body was never
    # iterated: HEAD, 204, 304); once the body was read to its end urllib3 has already
    # returned the connection to the pool and this is a no-op.
    response.call_on_close(upstream.close)
    return response


def relay_body(raw):
    """Yield upstream body bytes as they arrive, undecoded."""
    read1 = raw.read1
    while True:
        try:
            data = read1(CHUNK_SIZE, decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise UpstreamAborted(type(exc).__name__) from None
        if not data:
            return
        yield data
