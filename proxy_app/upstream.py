"""The upstream transport: one pooled ``requests.Session`` per worker process.

The Session is built so that it adds nothing of its own (SPEC §3, "Transport"):
``trust_env = False`` (no ``.netrc`` credentials, no ``*_PROXY`` variables), a cookie jar
whose policy stores nothing (an upstream ``Set-Cookie`` must never ride along on another
caller's request), no default headers, no retries.

Requests go straight to the Session's ``HTTPAdapter``: ``Session.send`` would run hooks,
fill the cookie jar and, even with ``allow_redirects=False``, read and decode the body of
every 3xx response to prepare the next hop (``Session.resolve_redirects``), which would
destroy a relayed redirect body. The adapter does the part we want: pooled urllib3
connections, TLS, timeouts, and translation of urllib3 errors into requests' exceptions.
"""

from __future__ import annotations

import http.cookiejar
import os
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPHeaderDict
from urllib3 import connectionpool
from urllib3.util import SKIP_HEADER

def _keep_target(target: str) -> str:
    return target


# urllib3 re-encodes every request-target in HTTPConnectionPool.urlopen: it upper-cases
# escapes (%2f -> %2F) and, when one escape in a component is invalid, encodes every "%"
# of that component again (/a%2Fb/%zz -> /a%252Fb/%25zz, which names a different path).
# The proxy sends the caller's raw target, already validated by gunicorn's request-line
# parser, below a config-validated target path: it must reach the upstream byte for byte
# (SPEC §3). The proxy is the only urllib3 user in its processes.
connectionpool._encode_target = _keep_target


def new_session(pool_maxsize: int) -> requests.Session:
    """A Session that adds nothing: no env, no cookies, no default headers, no retries."""
    session = requests.Session()
    session.trust_env = False
    session.headers.clear()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.max_redirects = 0
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=pool_maxsize, max_retries=0, pool_block=False)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Transport:
    """Owns the per-process Session; re-creates it in a forked child.

    gunicorn forks workers; sockets pooled before a fork would be shared by two processes
    and corrupt each other (benoitc/gunicorn#1953), so the Session is built lazily, and a
    fork drops it.
    """

    def __init__(self, pool_maxsize: int, connect_timeout: float):
        self.pool_maxsize = pool_maxsize
        self.connect_timeout = connect_timeout
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
                    self._session = new_session(self.pool_maxsize)
        return self._session

    def send(self, method: str, url: str, headers: list[tuple[str, str]], body, read_timeout: float) -> requests.Response:
        """Send one request and return as soon as the response head has arrived.

        :raises requests.RequestException: the upstream failed before the response began.
        :raises proxy_app.body.BadRequestBody: the caller's body broke its framing.
        """
        outgoing = HTTPHeaderDict(headers)
        # urllib3 would add "User-Agent: python-urllib3/x" and http.client
        # "Accept-Encoding: identity" when absent; the upstream sees only what the caller
        # and the config sent (SPEC §3).
        if "user-agent" not in outgoing:
            outgoing["User-Agent"] = SKIP_HEADER
        if "accept-encoding" not in outgoing:
            outgoing["Accept-Encoding"] = SKIP_HEADER
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        prepared.headers = outgoing
        prepared.body = body
        prepared.hooks = {"response": []}
        adapter = self.session.get_adapter(url)
        return adapter.send(
            prepared,
            stream=True,
            timeout=(self.connect_timeout, read_timeout),
            verify=True,
            cert=None,
            proxies={},
        )
