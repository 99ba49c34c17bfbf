"""The request lifecycle of one pass-through call, top to bottom.

    authorize -> prepare (target and headers) -> send (body streamed) -> relay, and one
    error handler for every way it can stop early

the way Go's ``httputil.ReverseProxy`` splits it (Rewrite, Transport, copy, ErrorHandler).
Everything per-endpoint was prepared at start-up (see config.Endpoint); the rules are pure
functions in urls.py and headers.py; :func:`prepare` only puts them in order.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass

from flask import Response
from flask import request
from urllib3 import HTTPResponse
from urllib3 import Timeout
from urllib3.exceptions import HTTPError

from proxy_app.auth import environ_key
from proxy_app.auth import key_carriers
from proxy_app.auth import presented_key
from proxy_app.body import CHUNK_SIZE
from proxy_app.body import BadRequestBody
from proxy_app.body import close_after_response
from proxy_app.body import request_body
from proxy_app.call_ids import new_call_id
from proxy_app.config import Endpoint
from proxy_app.config import Settings
from proxy_app.debug import debug_request
from proxy_app.debug import debug_response
from proxy_app.errors import NOT_FOUND
from proxy_app.errors import Refusal
from proxy_app.errors import causes
from proxy_app.errors import describe_cause
from proxy_app.errors import error_response
from proxy_app.errors import failure_kind
from proxy_app.errors import failure_of
from proxy_app.errors import refuse
from proxy_app.errors import settle_body
from proxy_app.errors import upstream_error_response
from proxy_app.headers import InvalidUpstreamHeaders
from proxy_app.headers import caller_headers
from proxy_app.headers import outbound_headers
from proxy_app.headers import response_headers
from proxy_app.key_gate import KeyGate
from proxy_app.observe import RECORD_KEY
from proxy_app.observe import Record
from proxy_app.upstream import Transport
from proxy_app.urls import build_query
from proxy_app.urls import has_dot_segment
from proxy_app.urls import join_path
from proxy_app.urls import raw_request_target
from proxy_app.urls import request_target
from proxy_app.urls import split_request_target
from proxy_app.urls import subpath_rest
from proxy_app.usage import MASTER

log = logging.getLogger("proxy_app")

DOT_SEGMENTS = "Dot segments ('.', '..') are not allowed in the path."
HEADERS_TOO_LARGE = "The request headers are too large."
# The caller's header block, in total: gunicorn limits each line and the line count, not
# the sum (100 x 8 KiB would pass). nginx's default allows 32 KiB.
MAX_HEADER_BYTES = 64 * 1024


@dataclass(slots=True)
class Outgoing:
    """What goes upstream: method, path and query below the target, and the headers."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]

    @property
    def target(self) -> str:
        return request_target(self.path, self.query)


def prepare(environ, endpoint: Endpoint, subpath: bool, carriers: frozenset[str]) -> Outgoing:
    """The upstream request for the caller's request in ``environ``: no I/O, no state.

    :param carriers: the caller headers that carry the proxy key (never forwarded).
    :raises Refusal: the request cannot be forwarded (404, 400, 431).
    """
    raw_path, caller_query = split_request_target(raw_request_target(environ))
    path = endpoint.target_path
    if subpath:
        rest = subpath_rest(raw_path, endpoint.path)
        if rest is None:
            raise Refusal(404, NOT_FOUND, "not_found_error")
        if has_dot_segment(rest):
            raise Refusal(400, DOT_SEGMENTS, "invalid_request_error")
        path = join_path(endpoint.target_path, rest)
    query = build_query(caller_query, endpoint.target_query, endpoint.merge_query_params, endpoint.default_query_params)

    caller = caller_headers(environ)
    if sum(len(name) + len(value) for name, value in caller) > MAX_HEADER_BYTES:
        raise Refusal(431, HEADERS_TOO_LARGE, "invalid_request_error")
    consumed = carriers | {endpoint.key_header} if endpoint.key_header else carriers
    headers = outbound_headers(
        caller,
        endpoint.headers,
        endpoint.configured_names,
        endpoint.forward_headers,
        environ.get("REMOTE_ADDR"),
        consumed,
    )
    return Outgoing(environ["REQUEST_METHOD"], path, query, headers)


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

    def __init__(self, settings: Settings, transport: Transport, detailed_debug: bool = False, gate: KeyGate | None = None):
        self.master_key = settings.master_key.encode() if settings.master_key else None
        self.transport = transport
        self.gate = gate
        self.debug = detailed_debug
        # connect: to reach the upstream; read: the most silence allowed between its bytes.
        # One Timeout per read timeout in use (stored endpoints come and go at run time).
        self.connect_timeout = settings.connect_timeout
        self.timeouts: dict[float, Timeout] = {}

    def __call__(self, endpoint: Endpoint, subpath: bool) -> Response:
        environ = request.environ
        record = start_record(environ, endpoint)
        try:
            carriers = self.authorize(environ, endpoint, record)
            outgoing = prepare(environ, endpoint, subpath, carriers)
            upstream = self.send(environ, endpoint, outgoing, record)
            response = relay(upstream, record, outgoing.method)
        except FAILURES as exc:
            return self.handle_error(environ, endpoint, record, exc)
        record.stream_started()
        return response

    def authorize(self, environ, endpoint: Endpoint, record: Record) -> frozenset[str]:
        """The caller headers carrying the proxy key (never forwarded).

        On an ``auth: true`` endpoint the caller needs the master key or a virtual key that
        passes its checks and limits (proxy_app/key_gate.py); the slot it takes is on the
        record, given back when the response ends (proxy_app/observe.py).

        :raises Refusal: 401, 403, 400, 429 or 503.
        """
        carriers = key_carriers(environ, self.master_key, endpoint.key_header)
        if carriers:
            record.api_key = MASTER
            return carriers
        if not endpoint.auth:
            return carriers
        presented, carrier = presented_key(environ, endpoint.key_header)
        if presented is None or self.gate is None:
            raise unauthorized(environ, endpoint, record.call_id)
        try:
            passed = self.gate.admit(presented, split_request_target(raw_request_target(environ))[0])
        except Refusal as refusal:
            record.api_key, record.key_alias = refusal.api_key, refusal.key_alias
            refusal.headers = [*refusal.headers, ("x-litellm-call-id", record.call_id)]
            raise
        record.api_key, record.key_alias, record.lease = passed.token, passed.key_alias, passed.lease
        record.answer_headers = passed.headers
        return frozenset((carrier,))

    def send(self, environ, endpoint: Endpoint, outgoing: Outgoing, record: Record) -> HTTPResponse:
        """Open the upstream request, the caller's body streamed; return once the head arrived."""
        if self.debug:
            shown_path = "/***" if endpoint.target_is_secret else outgoing.path
            debug_request(record.call_id, outgoing.method, endpoint.origin, shown_path, outgoing.query, outgoing.headers)
        body = request_body(environ, outgoing.headers)
        upstream = self.transport.send(
            outgoing.method, endpoint.origin, outgoing.target, outgoing.headers, body, self.timeout(endpoint.timeout)
        )
        record.ttfb = time.perf_counter() - record.started
        if self.debug:
            debug_response(record.call_id, upstream)
        return upstream

    def timeout(self, read: float) -> Timeout:
        timeout = self.timeouts.get(read)
        if timeout is None:
            timeout = self.timeouts[read] = Timeout(connect=self.connect_timeout, read=read)
        return timeout

    def handle_error(self, environ, endpoint: Endpoint, record: Record, exc: Exception) -> Response:
        """The answer when the call stops before a response is relayed; nothing was sent yet."""
        if isinstance(exc, Refusal):
            return refuse(environ, exc.status, exc.message, exc.kind, exc.headers)
        if isinstance(exc, BadRequestBody):
            record.error = "bad_request_body"
            response = error_response(exc.status, str(exc) + ".", "invalid_request_error")
            # The rest of the connection cannot be trusted to hold a next request.
            close_after_response(environ, response)
            return response
        if isinstance(exc, InvalidUpstreamHeaders):  # relay() refused the head
            failure, cause = failure_of("invalid_response"), str(exc)
        else:
            chain = causes(exc)
            failure, cause = failure_of(failure_kind(chain)), describe_cause(chain)
        record.error = failure.kind
        log.warning(
            "upstream failure: endpoint %s -> %s: %s (%s)",
            endpoint.path,
            "(secret target)" if endpoint.target_is_secret else endpoint.netloc,
            cause,
            failure.kind,
        )
        return settle_body(environ, upstream_error_response(failure, record.call_id))


# What ends a call early: the proxy's own refusals, a broken caller body, and every way
# the upstream can fail before its response begins (requests' exceptions are OSErrors).
FAILURES = (Refusal, BadRequestBody, InvalidUpstreamHeaders, HTTPError, OSError)


def start_record(environ, endpoint: Endpoint) -> Record:
    """The access record of this call, with what is known before anything is sent."""
    record = environ[RECORD_KEY]
    record.route = endpoint.path
    record.call_id = new_call_id()
    record.cost = endpoint.cost_per_request
    return record


def unauthorized(environ, endpoint: Endpoint, call_id: str) -> Refusal:
    presented = environ.get("HTTP_AUTHORIZATION") or environ.get("HTTP_X_LITELLM_API_KEY") or (
        endpoint.key_header and environ.get(environ_key(endpoint.key_header))
    )
    message = "Authentication Error, invalid proxy key." if presented else "Authentication Error, No api key passed in."
    return Refusal(401, message, "auth_error", [("x-litellm-call-id", call_id)])


def relay(upstream: HTTPResponse, record: Record, method: str) -> Response:
    """Relay the upstream status line, headers and body exactly, streaming the body.

    :raises InvalidUpstreamHeaders: before anything was sent to the caller; the upstream
        connection is closed (never reused).
    """
    if method == "HEAD" or upstream.status in (204, 304) or upstream.status < 200:
        # No body follows (RFC 9110 §6.4.1): reading the empty body lets urllib3 return
        # the connection to the pool instead of closing it.
        upstream.read(decode_content=False)
    try:
        headers = response_headers(upstream.headers.items())
    except InvalidUpstreamHeaders:
        finish_upstream(upstream)
        raise
    headers.append(("x-litellm-call-id", record.call_id))
    if record.answer_headers:
        headers.extend(record.answer_headers)
    # The upstream's own price for this call (LiteLLM's cost contract), for the usage row.
    record.response_cost = upstream.headers.get("x-litellm-response-cost")
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
