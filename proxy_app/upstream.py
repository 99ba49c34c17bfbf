"""The upstream transport: one pooled ``requests.Session`` per worker process.

Every upstream request goes through ``Session.send(request, stream=True,
allow_redirects=False)`` on :class:`ProxySession`, with :class:`ProxyAdapter` mounted for
both schemes. Both are requests' documented extension points (a Session subclass; an
``HTTPAdapter`` subclass overriding the methods requests exposes "for use when subclassing
the HTTPAdapter"); no private requests API is used.

What they make sure of:

- The Session adds nothing of its own: ``trust_env = False`` (no ``.netrc`` credentials, no
  ``*_PROXY`` variables), a cookie jar that keeps nothing (one caller's ``Set-Cookie`` is
  never sent for another), no default headers, no retries (``Retry(0, read=False)``: a
  request that may have reached the upstream is never resent).
- A 3xx is relayed, never followed and its body never read: ``Session.send`` asks
  ``get_redirect_target`` even with ``allow_redirects=False`` and, given a location, reads
  the whole body to prepare the next hop. :class:`ProxySession` answers None (and its
  ``resolve_redirects``, which Session.send calls, yields nothing).
- The request target reaches urllib3 as the caller sent it: the request is an
  :class:`UpstreamRequest` built from parts the proxy validated (``prepare()`` would
  re-encode the URL), and ``request_url`` returns that target.
- The answer relayed is ``response.raw``, the urllib3 response, read undecoded.
"""

from __future__ import annotations

import datetime
import os
import threading

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from urllib3 import HTTPConnectionPool
from urllib3 import HTTPResponse
from urllib3 import HTTPSConnectionPool
from urllib3 import Timeout
from urllib3.util import SKIP_HEADER

from proxy_app import wire
from proxy_app.body import UPLOAD_BLOCK
from proxy_app.patches import speedups_enabled

# Every upstream request goes direct, verified against requests' CA bundle, no client cert.
SEND_SETTINGS = {"stream": True, "allow_redirects": False, "proxies": {}, "verify": True, "cert": None}


class NoCookies(RequestsCookieJar):
    """A cookie jar that keeps nothing: the proxy relays Set-Cookie, it never replays it."""

    def extract_cookies(self, response, request) -> None:
        return None

    def set_cookie(self, cookie, *args, **kwargs) -> None:
        return None


_SHARED_NO_COOKIES = NoCookies()
_NO_TIME = datetime.timedelta(0)


class OutgoingHeaders(dict):
    """The outgoing header fields, names unique and as written (what urllib3 iterates),
    with the case-insensitive membership test ``HTTPAdapter.send`` uses to choose between
    Content-Length and chunked framing."""

    __slots__ = ("_names",)

    def __init__(self, fields: dict[str, str], names: set[str]):
        super().__init__(fields)
        self._names = names

    def __contains__(self, name) -> bool:
        return name.lower() in self._names


class RelayedResponse(requests.Response):
    """requests' Response for an answer the proxy relays from ``raw`` itself.

    requests' constructor builds an empty cookie jar (a lock and a cookie policy) and an
    empty header dict for every response: about 5 us per request for a Response whose
    cookies nobody reads (Set-Cookie is relayed, never stored) and whose headers are
    urllib3's. This constructor sets the same attributes, sharing one empty jar that keeps
    nothing. tests/test_upstream_session.py compares the attributes with requests' own, so a
    requests release that adds one fails there, not in production.
    """

    def __init__(self):  # requests' attributes, in requests' order
        self._content = False
        self._content_consumed = False
        self._next = None
        self.status_code = None
        self.headers = None
        self.raw = None
        self.url = None
        self.encoding = None
        self.history = []
        self.reason = None
        self.cookies = _SHARED_NO_COOKIES
        self.elapsed = _NO_TIME
        self.request = None


class UpstreamRequest(requests.PreparedRequest):
    """A PreparedRequest made of parts the proxy already validated, without ``prepare()``
    (which would re-encode the URL and rewrite the headers). The attributes are public
    (requests' PreparedRequest docs); ``origin`` and ``target`` are the proxy's own."""

    def __init__(self, method: str, origin: str, target: str, headers: OutgoingHeaders, body):
        super().__init__()
        self.method = method
        self.url = origin + target
        self.headers = headers
        self.body = body
        self.origin = origin
        self.target = target


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = wire.UpstreamHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = wire.UpstreamHTTPSConnection


class _OneWriteHTTPPool(HTTPConnectionPool):
    ConnectionCls = wire.OneWriteHTTPConnection


class _OneWriteHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = wire.OneWriteHTTPSConnection


class ProxyAdapter(HTTPAdapter):
    """requests' adapter with the proxy's connection classes, and per-origin pools kept.

    Speed-only (off with ``PROXY_SPEEDUPS=0``): the one-write connection classes
    (wire.py) and upload blocks of UPLOAD_BLOCK instead of http.client's 16 KiB.
    """

    def __init__(self, pool_maxsize: int, origins: int, speedups: bool):
        self.speedups = speedups
        self._pools: dict[str, HTTPConnectionPool] = {}
        self._verified: set[HTTPConnectionPool] = set()
        # One pool per origin, all kept: the manager never evicts (and closes) a pool
        # this adapter still holds.
        super().__init__(pool_connections=max(origins, 10), pool_maxsize=pool_maxsize, max_retries=0, pool_block=False)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        if self.speedups:
            pool_kwargs["blocksize"] = UPLOAD_BLOCK
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        # urllib3's documented per-scheme pool classes.
        if self.speedups:
            self.poolmanager.pool_classes_by_scheme = {"http": _OneWriteHTTPPool, "https": _OneWriteHTTPSPool}
        else:
            self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        # The proxy sends every request with the same settings (SEND_SETTINGS), so an
        # origin's pool, with its TLS settings, is looked up once: requests would parse the
        # URL twice and build a pool key on every request.
        origin = getattr(request, "origin", None)
        pool = self._pools.get(origin) if origin else None
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
            if origin:
                self._pools[origin] = pool
        return pool

    def cert_verify(self, conn, url, verify, cert):
        # requests looks the CA bundle up on disk (three stat calls) on every HTTPS request
        # before it sets the pool's TLS settings; with the proxy's fixed settings, once per
        # pool gives the same settings.
        if conn in self._verified:
            return
        super().cert_verify(conn, url, verify, cert)
        if any(conn is pool for pool in self._pools.values()):  # kept for good, never reused
            self._verified.add(conn)

    def build_response(self, req, resp):
        # requests' version copies every header into a CaseInsensitiveDict, guesses a text
        # encoding and parses Set-Cookie into a jar for this Response: about 10 us per
        # request for things the relay never reads (it relays resp, response.raw, itself).
        # urllib3's header dict is case-insensitive too.
        response = RelayedResponse()
        response.status_code = resp.status
        response.headers = resp.headers
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def request_url(self, request, proxies):
        target = getattr(request, "target", None)
        return target if target is not None else super().request_url(request, proxies)


class ProxySession(requests.Session):
    """A Session that adds nothing and never follows, nor reads, a redirect."""

    def __init__(self, adapter: HTTPAdapter):
        super().__init__()
        self.trust_env = False
        self.headers.clear()
        self.cookies = NoCookies()
        self.max_redirects = 0
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self.adapter = adapter

    def get_adapter(self, url):
        # One adapter for both schemes (the only ones a config accepts): no prefix search.
        return self.adapter

    def get_redirect_target(self, resp):
        # Never a next hop: requests then neither follows a 3xx nor reads its body (which
        # Session.send otherwise does even with allow_redirects=False, to prepare the hop).
        return None

    def resolve_redirects(self, resp, req, *args, **kwargs):
        # What requests' own generator yields when get_redirect_target is None, without
        # parsing the URL first (Session.send asks it once per request).
        return iter(())


def new_session(pool_maxsize: int, origins: int, speedups: bool | None = None) -> ProxySession:
    if speedups is None:
        speedups = speedups_enabled()
    return ProxySession(ProxyAdapter(pool_maxsize, origins, speedups))


class Transport:
    """Owns the per-process Session and its pools; re-creates them in a forked child.

    gunicorn forks workers; sockets pooled before a fork would be shared by two processes
    and corrupt each other (benoitc/gunicorn#1953), so the Session is built lazily, and a
    fork drops it.
    """

    def __init__(self, pool_maxsize: int, origins: int = 1):
        self.pool_maxsize = pool_maxsize
        self.origins = origins
        self._session: requests.Session | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._session = None
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = new_session(self.pool_maxsize, self.origins)
        return self._session

    def send(self, method: str, origin: str, target: str, headers: list[tuple[str, str]], body, timeout: Timeout) -> HTTPResponse:
        """Send one request and return the upstream's response as soon as its head has arrived.

        :raises requests.RequestException: the upstream failed before the response began
            (see errors.upstream_failure).
        :raises proxy_app.body.BadRequestBody: the caller's body broke its framing.
        """
        fields = dict(headers)
        names = {name.lower() for name in fields}
        # urllib3 would add "User-Agent: python-urllib3/x" and http.client
        # "Accept-Encoding: identity" when absent; the upstream sees only what the caller
        # and the config sent.
        if "user-agent" not in names:
            fields["User-Agent"] = SKIP_HEADER
        if "accept-encoding" not in names:
            fields["Accept-Encoding"] = SKIP_HEADER
        request = UpstreamRequest(method, origin, target, OutgoingHeaders(fields, names), body)
        return self.session.send(request, timeout=timeout, **SEND_SETTINGS).raw
