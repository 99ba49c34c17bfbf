"""The request lifecycle of one pass-through call, top to bottom.

    check the proxy key -> build the upstream target -> build the headers -> open the
    upstream request (body streamed) -> relay status, headers and body as they arrive

Everything per-endpoint was prepared at start-up (see config.Endpoint); the rules are
pure functions in urls.py and headers.py; here they are only put in order.
"""

from __future__ import annotations

import errno
import time
import uuid

from flask import Response
from flask import request
from urllib3 import HTTPResponse
from urllib3 import Timeout
from urllib3.exceptions import HeaderParsingError
from urllib3.exceptions import HTTPError
from urllib3.util.response import assert_header_parsing

from proxy_app.auth import environ_key
from proxy_app.auth import key_carriers
from proxy_app.body import CHUNK_SIZE
from proxy_app.body import BadRequestBody
from proxy_app.body import close_after_response
from proxy_app.body import request_body
from proxy_app.config import Endpoint
from proxy_app.config import Settings
from proxy_app.debug import debug_request
from proxy_app.debug import debug_response
from proxy_app.errors import NOT_FOUND
from proxy_app.errors import error_response
from proxy_app.errors import refuse
from proxy_app.errors import settle_body
from proxy_app.errors import upstream_error_response
from proxy_app.headers import InvalidUpstreamHeaders
from proxy_app.headers import caller_headers
from proxy_app.headers import outbound_headers
from proxy_app.headers import response_headers
from proxy_app.observe import RECORD_KEY
from proxy_app.upstream import Transport
from proxy_app.urls import build_query
from proxy_app.urls import has_dot_segment
from proxy_app.urls import join_path
from proxy_app.urls import raw_request_target
from proxy_app.urls import request_target
from proxy_app.urls import split_request_target
from proxy_app.urls import subpath_rest


DOT_SEGMENTS = "Dot segments ('.', '..') are not allowed in the path."
HEADERS_TOO_LARGE = "The request headers are too large."
BAD_UPSTREAM_HEAD = "The upstream sent a response head that cannot be relayed."
# The caller's header block, in total: gunicorn limits each line and the line count, not
# the sum (100 x 8 KiB would pass). nginx's default allows 32 KiB.
MAX_HEADER_BYTES = 64 * 1024


class RelayResponse(Response):
    """The upstream's answer, headers exactly as relayed."""

    # Werkzeug would invent "Content-Type: text/html" for an upstream answer that had none.
    default_mimetype = None

    def get_wsgi_headers(self, environ):
        # Werkzeug's version copies the headers and rewrites them (re-encodes Location with
        # iri_to_uri, drops some on 304); the relayed head is already final and validated.
        return self.headers


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
        # connect: to reach the upstream; read: the most silence allowed between its bytes.
        self.timeouts = {e.index: Timeout(connect=settings.connect_timeout, read=e.timeout) for e in settings.endpoints}

    def __call__(self, endpoint: Endpoint, subpath: bool) -> Response:
        environ = request.environ
        method = environ["REQUEST_METHOD"]
        call_id = str(uuid.uuid4())
        record = environ[RECORD_KEY]
        record.route = endpoint.path
        record.call_id = call_id
        record.cost = endpoint.cost_per_request
        carriers = key_carriers(environ, self.master_key, endpoint.key_header)
        if endpoint.auth and not carriers:
            return settle_body(environ, unauthorized(environ, endpoint, call_id))

        raw_path, caller_query = split_request_target(raw_request_target(environ))
        path = endpoint.target_path
        if subpath:
            rest = subpath_rest(raw_path, endpoint.path)
            if rest is None:
                return refuse(environ, 404, NOT_FOUND, "not_found_error")
            if has_dot_segment(rest):
                return refuse(environ, 400, DOT_SEGMENTS, "invalid_request_error")
            path = join_path(endpoint.target_path, rest)
        query = build_query(caller_query, endpoint.target_query, endpoint.merge_query_params, endpoint.default_query_params)
        target = request_target(path, query)

        caller = caller_headers(environ)
        if sum(len(name) + len(value) for name, value in caller) > MAX_HEADER_BYTES:
            return refuse(environ, 431, HEADERS_TOO_LARGE, "invalid_request_error")
        consumed = carriers | {endpoint.key_header} if endpoint.key_header else carriers
        headers = outbound_headers(
            caller,
            endpoint.headers,
            endpoint.configured_names,
            endpoint.forward_headers,
            environ.get("REMOTE_ADDR"),
            consumed,
        )

        if self.debug:
            shown_path = "/***" if endpoint.target_is_secret else path
            debug_request(call_id, method, endpoint.origin, shown_path, query, headers)
        try:
            body = request_body(environ, headers)
            upstream = self.transport.send(method, endpoint.origin, target, headers, body, self.timeouts[endpoint.index])
        except BadRequestBody as exc:
            # The rest of the connection cannot be trusted to hold a next request.
            record.error = "bad_request_body"
            response = error_response(exc.status, str(exc) + ".", "invalid_request_error")
            close_after_response(environ, response)
            return response
        except (HTTPError, OSError) as exc:
            response, record.error = upstream_error_response(exc, call_id)
            return settle_body(environ, response)
        record.ttfb = time.perf_counter() - record.started
        if self.debug:
            debug_response(call_id, upstream)
        try:
            response = relay(upstream, call_id, method)
        except InvalidUpstreamHeaders:
            finish_upstream(upstream)  # that connection is never reused
            record.error = "invalid_response"
            return refuse(environ, 502, BAD_UPSTREAM_HEAD, "upstream_error", [("x-litellm-call-id", call_id)])
        record.stream_started()
        return response


def unauthorized(environ, endpoint: Endpoint, call_id: str) -> Response:
    presented = environ.get("HTTP_AUTHORIZATION") or environ.get("HTTP_X_LITELLM_API_KEY") or (
        endpoint.key_header and environ.get(environ_key(endpoint.key_header))
    )
    message = "Authentication Error, invalid proxy key." if presented else "Authentication Error, No api key passed in."
    return error_response(401, message, "auth_error", [("x-litellm-call-id", call_id)])


def relay(upstream: HTTPResponse, call_id: str, method: str) -> Response:
    """Relay the upstream status line, headers and body exactly, streaming the body.

    :raises InvalidUpstreamHeaders: before anything was sent to the caller.
    """
    check_head_parsed(upstream)
    if method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200:
        # No body follows (RFC 9110 §6.4.1): reading the empty body lets urllib3 return
        # the connection to the pool instead of closing it.
        upstream.read(decode_content=False)
    headers = response_headers(upstream.headers.items())
    headers.append(("x-litellm-call-id", call_id))
    if "text/event-stream" in upstream.headers.get("content-type", ""):
        # nginx honours (and hides) this, so the stream is not buffered on the way out.
        headers.append(("X-Accel-Buffering", "no"))
    status = f"{upstream.status} {upstream.reason}" if upstream.reason else upstream.status
    # direct_passthrough: Werkzeug hands RelayBody to the server as it is, instead of
    # wrapping it in two more iterators (iter_encoded, ClosingIterator) that every chunk
    # would pass through. Bodiless answers still get Werkzeug's empty body, and closing
    # the response closes RelayBody either way.
    return RelayResponse(RelayBody(upstream), status=status, headers=headers, direct_passthrough=True)


def finish_upstream(upstream: HTTPResponse) -> None:
    upstream.close()
    upstream.release_conn()


def check_head_parsed(raw) -> None:
    """Refuse a head http.client could only partly parse.

    A malformed line ("Content-Length : 2") ends http.client's header parsing early; the
    rest of the head would be read as body. urllib3 only logs this (HeaderParsingError).
    """
    message = getattr(getattr(raw, "_original_response", None), "msg", None)
    if message is not None:
        try:
            assert_header_parsing(message)
        except HeaderParsingError:
            raise InvalidUpstreamHeaders("unparsable response head") from None


class RelayBody:
    """The upstream body as a WSGI response iterable: bytes as they arrive, undecoded."""

    __slots__ = ("upstream",)

    def __init__(self, upstream: HTTPResponse):
        self.upstream = upstream

    def __iter__(self):
        read1 = self.upstream.read1
        while True:
            try:
                data = read1(CHUNK_SIZE, decode_content=False)
            except (HTTPError, OSError) as exc:
                raise UpstreamAborted(type(exc).__name__) from None
            if not data:
                return
            yield data

    def close(self) -> None:
        # Closes the upstream connection when the caller left early (or the body was
        # never iterated: HEAD, 204, 304), then gives the pool its slot back, as requests'
        # Response.close does; once the body was read to its end urllib3 has already
        # returned the connection to the pool and this is a no-op.
        finish_upstream(self.upstream)
