"""The upstream transport: one pooled ``requests.Session`` per worker process.

The Session is built so that it adds nothing of its own (SPEC §3, "Transport"):
``trust_env = False`` (no ``.netrc`` credentials, no ``*_PROXY`` variables), a cookie jar
whose policy stores nothing, no default headers, no retries (``Retry(0, read=False)``).

Requests go straight to the urllib3 pool that the Session's ``HTTPAdapter`` keeps for the
target, taken once per origin with the adapter's own TLS settings
(``get_connection_with_tls_context``, ``cert_verify``) and called with exactly the
arguments ``HTTPAdapter.send`` uses. What is skipped is per-request work the proxy must
not have: ``Session.send`` runs hooks, fills the cookie jar and, even with
``allow_redirects=False``, reads and decodes the body of every 3xx response to prepare the
next hop (``Session.resolve_redirects``), which would destroy a relayed redirect body;
``HTTPAdapter.send`` re-parses the URL, rebuilds the pool key and copies every response
header into a ``requests.Response`` that the relay never uses.
"""

from __future__ import annotations

import http.cookiejar
import os
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool
from urllib3 import HTTPResponse
from urllib3 import Timeout
from urllib3 import connectionpool
from urllib3.util import Retry
from urllib3.util import SKIP_HEADER

from proxy_app import wire
from proxy_app.body import UPLOAD_BLOCK


def _keep_target(target: str) -> str:
    return target


# urllib3 re-encodes every request-target in HTTPConnectionPool.urlopen: it upper-cases
# escapes (%2f -> %2F) and, when one escape in a component is invalid, encodes every "%"
# of that component again (/a%2Fb/%zz -> /a%252Fb/%25zz, which names a different path).
# The proxy sends the caller's raw target, already validated by gunicorn's request-line
# parser, below a config-validated target path: it must reach the upstream byte for byte
# (SPEC §3). The proxy is the only urllib3 user in its processes.
connectionpool._encode_target = _keep_target
wire.install()


class _Adapter(HTTPAdapter):
    """requests' adapter, with upload blocks of UPLOAD_BLOCK instead of http.client's 16 KiB."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["blocksize"] = UPLOAD_BLOCK
        super().init_poolmanager(*args, **kwargs)


def new_session(pool_maxsize: int, origins: int) -> requests.Session:
    """A Session that adds nothing: no env, no cookies, no default headers, no retries."""
    session = requests.Session()
    session.trust_env = False
    session.headers.clear()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.max_redirects = 0
    # One pool per origin, all kept: a pool evicted from the manager would be closed under
    # the transport's cached reference.
    adapter = _Adapter(pool_connections=max(origins, 10), pool_maxsize=pool_maxsize, max_retries=0, pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


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
        self._pools: dict[str, tuple[HTTPConnectionPool, Retry]] = {}
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._session = None
        self._pools = {}
        self._lock = threading.Lock()

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = new_session(self.pool_maxsize, self.origins)
        return self._session

    def pool(self, origin: str) -> tuple[HTTPConnectionPool, Retry]:
        """The adapter's pool for ``scheme://host:port`` (TLS verification set) and its retries."""
        entry = self._pools.get(origin)
        if entry is None:
            adapter = self.session.get_adapter(origin)
            probe = requests.PreparedRequest()
            probe.prepare(method="GET", url=origin + "/")
            pool = adapter.get_connection_with_tls_context(probe, verify=True, proxies={}, cert=None)
            adapter.cert_verify(pool, probe.url, True, None)
            # Before the pool opens its first connection (see wire.py).
            pool.ConnectionCls = wire.OneWriteHTTPSConnection if pool.scheme == "https" else wire.OneWriteHTTPConnection
            # Retry(0, read=False): a request that may have reached the upstream is never resent.
            entry = self._pools[origin] = (pool, adapter.max_retries)
        return entry

    def send(self, method: str, origin: str, target: str, headers: list[tuple[str, str]], body, timeout: Timeout) -> HTTPResponse:
        """Send one request and return as soon as the response head has arrived.

        :raises urllib3.exceptions.HTTPError: the upstream failed before the response began
            (see errors.upstream_error_response).
        :raises proxy_app.body.BadRequestBody: the caller's body broke its framing.
        """
        # The names are unique (headers.outbound_headers builds them so): a plain dict is
        # what urllib3 iterates anyway, without HTTPHeaderDict's per-header bookkeeping.
        outgoing = dict(headers)
        names = {name.lower() for name in outgoing}
        # urllib3 would add "User-Agent: python-urllib3/x" and http.client
        # "Accept-Encoding: identity" when absent; the upstream sees only what the caller
        # and the config sent (SPEC §3).
        if "user-agent" not in names:
            outgoing["User-Agent"] = SKIP_HEADER
        if "accept-encoding" not in names:
            outgoing["Accept-Encoding"] = SKIP_HEADER
        pool, retries = self.pool(origin)
        return pool.urlopen(
            method,
            target,
            body=body,
            headers=outgoing,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            retries=retries,
            timeout=timeout,
            # As HTTPAdapter.send: a body without a Content-Length goes chunked.
            chunked=body is not None and "content-length" not in names,
        )
