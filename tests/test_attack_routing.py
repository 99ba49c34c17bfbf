"""Adversarial routing and credential isolation, through the production stack.

Real gunicorn (deploy/gunicorn.conf.py) serves every test here; requests are written on RAW
SOCKETS, because an HTTP client library would normalise the very request-targets under
test (dot segments, ``//``, ``\\``, absolute form). Two recording servers listen on
loopback: ``up``, the configured upstream, and ``trap``, which no config names. The trap
must never see a connection, whatever the caller sends and whatever the proxy's
environment says (README: "Security and hostile input").

One gunicorn per group (module-scoped fixtures), so the file runs in seconds:

- ``routing``: ``/sub``, ``/fwd`` (forward_headers) and ``/deep/sub``, all include_subpath,
  run twice: target ``<up>/base/api``, then ``<up>`` with no path.
- ``cred``: started with every ``*_PROXY`` variable pointing at the trap, an empty
  ``NO_PROXY``, a ``HOME``/``NETRC`` holding a ``.netrc`` for 127.0.0.1, and
  ``DETAILED_DEBUG=1`` (so the log check covers the debug traces too).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
import requests

from tests.conftest import MASTER_KEY
from tests.conftest import SECRET
from tests.conftest import config_for
from tests.conftest import subprocess_env
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream
from tests.upstream import close_without_response
from tests.upstream import fixed
from tests.upstream import stall

IO_TIMEOUT = 5.0
MAX_REPLY = 1 << 20
AUTH_HEADER = {"Authorization": "Bearer os.environ/SECRET"}
BEARER = f"Bearer {SECRET}"
NETRC_USER, NETRC_PASS = "netrc-user", "netrc-pass"
NETRC_B64 = base64.b64encode(f"{NETRC_USER}:{NETRC_PASS}".encode()).decode()
CALLER_WRONG_KEY = "sk-caller-wrong-key-9f8e7d"
# Never forwarded, whatever forward_headers says (README's endpoint table, `forward_headers`).
NEVER_UPSTREAM = ("x-forwarded-host", "x-forwarded-proto", "forwarded", "proxy", "proxy-authorization")


# --------------------------------------------------------------------------
# A raw HTTP/1.1 client: bytes out exactly as written, bounded reads in
# --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the connection closed without a status line
    headers: list
    body: bytes
    raw: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [v for k, v in self.headers if k.lower() == wanted]


def http_request(method: str, target: str, headers=(), body: bytes = b"", host: str | None = "proxy.test") -> bytes:
    """One request, exactly as given; ``Connection: close`` so the reply ends with EOF."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _dechunk(data: bytes) -> bytes | None:
    """The body of a complete chunked message, or None while it is incomplete."""
    body, pos = bytearray(), 0
    for _ in range(100_000):  # bounded: one iteration per chunk
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            tail = data[eol + 2 :]  # trailers, then an empty line
            return bytes(body) if tail.startswith(b"\r\n") or b"\r\n\r\n" in tail else None
        start = eol + 2
        if len(data) < start + size + 2:
            return None
        body += data[start : start + size]
        pos = start + size + 2
    raise AssertionError("too many chunks")


def parse_reply(data: bytes, eof: bool) -> Reply | None:
    """A Reply when ``data`` holds a whole response (or at EOF), else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Reply(None, [], b"", data, False) if eof else None
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    rest = data[end + 4 :]
    reply = Reply(status, headers, rest, data, True)
    codings = ",".join(reply.header_all("transfer-encoding")).lower()
    if status is not None and (100 <= status < 200 or status in (204, 304)):
        reply.body = b""
    elif "chunked" in codings:
        body = _dechunk(rest)
        if body is None:
            if not eof:
                return None
            reply.complete = False
        else:
            reply.body = body
    elif reply.header("content-length") is not None and reply.header("content-length").isdigit():
        length = int(reply.header("content-length"))
        if len(rest) < length:
            if not eof:
                return None
            reply.complete = False
        reply.body = rest[:length]
    elif not eof:
        return None
    return reply


def raw_exchange(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> Reply:
    """Send ``data`` on a fresh connection; read one response (bounded in time and size)."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        while len(received) < MAX_REPLY:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no complete response within {timeout}s: {bytes(received[:500])!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return parse_reply(bytes(received), eof=True)
            received += chunk
            reply = parse_reply(bytes(received), eof=False)
            if reply is not None:
                return reply
    raise AssertionError("response larger than 1 MiB")


# --------------------------------------------------------------------------
# Shared servers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up():
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def trap():
    with Upstream() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_records(up, trap):
    up.requests.clear()
    trap.requests.clear()


def assert_trap_untouched(trap: Upstream) -> None:
    assert trap.connections_opened == 0 and trap.requests == [], (
        f"the trap was reached: {trap.connections_opened} connection(s), "
        f"{[(r.method, r.target, r.headers) for r in trap.requests]}"
    )


def assert_clean_log(server) -> None:
    log = server.log()
    assert SECRET not in log, "the injected secret appears in the gunicorn log"
    assert MASTER_KEY not in log, "the master key appears in the gunicorn log"
    assert CALLER_WRONG_KEY not in log, "a caller's key appears in the gunicorn log"
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------
# Where the request goes
# --------------------------------------------------------------------------

TARGET_PATHS = {"base-path": "/base/api", "no-path": ""}


@dataclass
class Routing:
    server: object
    kind: str
    base: str  # the target's path; "" for a target with no path


@pytest.fixture(scope="module")
def routing(request, up, trap, tmp_path_factory):
    kind = request.param
    target = up.url + TARGET_PATHS[kind]
    config = config_for(
        {"path": "/sub", "target": target, "include_subpath": True, "headers": AUTH_HEADER},
        {"path": "/fwd", "target": target, "include_subpath": True, "forward_headers": True, "headers": AUTH_HEADER},
        {"path": "/deep/sub", "target": target, "include_subpath": True, "headers": AUTH_HEADER},
    )
    path = write_config(tmp_path_factory.mktemp(f"routing-{kind}"), config)
    with run_gunicorn(path, subprocess_env(), workers=1, threads=8) as server:
        yield Routing(server, kind, TARGET_PATHS[kind])


def dotdot_segments(path: str) -> list[str]:
    """Segments that are ".." once percent-decoded (split on "/" and "\\", ";params" dropped)."""
    return [s for s in re.split(r"[/\\]", unquote(path)) if s.split(";", 1)[0] == ".."]


def assert_stayed_inside(routing: Routing, up: Upstream, trap: Upstream, reply: Reply) -> None:
    """No target reaches another host or a path outside the target's path."""
    assert reply.status is not None, f"no response at all: {reply.raw[:300]!r}"
    assert 200 <= reply.status < 300 or 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert_trap_untouched(trap)
    seen = list(up.requests)
    # The upstream answers 200 to everything: a 2xx is its answer, a 4xx is the proxy's own.
    assert len(seen) == (1 if reply.status < 300 else 0), [(r.method, r.target) for r in seen]
    for r in seen:
        assert r.path.startswith("/") and not r.path.startswith("//"), r.target
        if routing.base:
            assert r.path == routing.base or r.path.startswith(routing.base + "/"), r.target
        assert dotdot_segments(r.path) == [], r.target
        assert r.header_all("Host") == [f"127.0.0.1:{up.port}"], r.headers
        assert r.header_all("Authorization") == [BEARER]
        for name in NEVER_UPSTREAM:
            assert r.header(name) is None, (name, r.headers)


# Request-targets; {trap} and {up} become those servers' ports.
ROUTING_VECTORS = [
    ("dotdot", "/sub/../x"),
    ("dotdot-twice", "/sub/../../x"),
    ("dotdot-at-end", "/sub/.."),
    ("dotdot-below-a-segment", "/sub/a/../../x"),
    ("pct-2e2e", "/sub/%2e%2e/x"),
    ("pct-2E2e", "/sub/%2E%2e/x"),
    ("dot-pct-2e", "/sub/.%2e/x"),
    ("pct-2e-dot", "/sub/%2e./x"),
    ("pct-2e2e-at-end", "/sub/%2e%2e"),
    ("double-pct-252e252e", "/sub/%252e%252e/x"),
    ("double-pct-252e252e-252f", "/sub/%252e%252e%252fx"),
    ("dotdot-pct-2f", "/sub/..%2fx"),
    ("dotdot-pct-2F", "/sub/..%2Fx"),
    ("pct-2e2e-2f", "/sub/%2e%2e%2fx"),
    ("pct-2e2e-2f-twice", "/sub/%2e%2e%2f%2e%2e%2fx"),
    ("dotdot-backslash", "/sub/..\\x"),
    ("dotdot-pct-5c", "/sub/..%5cx"),
    ("dotdot-pct-5C-twice", "/sub/..%5C..%5Cx"),
    ("dotdot-semicolon", "/sub/..;/x"),
    ("dotdot-semicolon-param", "/sub/..;a=b/x"),
    ("dot", "/sub/./x"),
    ("pct-dot", "/sub/%2e/x"),
    ("overlong-utf8-dots", "/sub/%c0%ae%c0%ae/x"),
    ("fullwidth-dots", "/sub/%ef%bc%8e%ef%bc%8e/x"),
    ("nul-then-dotdot", "/sub/%00/../x"),
    ("dotdot-pct-00", "/sub/..%00/x"),  # forwarded: "..\0" is no dot segment (RFC 3986)
    ("dotdot-pct-20", "/sub/..%20/x"),  # forwarded: ".. " is no dot segment (RFC 3986)
    ("pct-2e2e-pct-3b", "/sub/%2e%2e%3b/x"),
    ("encoded-qmark-then-dotdot", "/sub/x%3F/../y"),
    ("encoded-hash-then-dotdot", "/sub/x%23/../y"),
    ("raw-8bit-overlong-dots", "/sub/\xc0\xae\xc0\xae/x"),
    ("double-slash-host", "//127.0.0.1:{trap}/x"),
    ("double-slash-host-sub", "//127.0.0.1:{trap}/sub/x"),
    ("sub-double-slash-host", "/sub//127.0.0.1:{trap}/x"),
    ("sub-triple-slash-host", "/sub///127.0.0.1:{trap}/x"),
    ("at-host", "@127.0.0.1:{trap}/sub/x"),
    ("sub-at-host", "/sub/@127.0.0.1:{trap}"),
    ("sub-glued-at-host", "/sub@127.0.0.1:{trap}/x"),
    ("absolute-form-sub", "http://127.0.0.1:{trap}/sub/x"),
    ("absolute-form-root", "http://127.0.0.1:{trap}/x"),
    ("absolute-form-no-path", "http://127.0.0.1:{trap}"),
    ("absolute-form-query-only", "http://127.0.0.1:{trap}?/sub/x"),
    ("absolute-form-userinfo", "http://127.0.0.1:{up}@127.0.0.1:{trap}/sub/x"),
    ("absolute-form-https", "https://127.0.0.1:{trap}/sub/x"),
    ("absolute-form-dotdot", "http://127.0.0.1:{trap}/sub/../x"),
    ("scheme-relative-sub", "//127.0.0.1:{trap}/sub/../x"),
    ("backslash-dotdot", "/sub\\..\\x"),
    ("sub-backslash-host", "/sub/\\\\127.0.0.1:{trap}"),
    ("sub-backslash-host-path", "/sub/\\\\127.0.0.1:{trap}/x"),
    ("backslash-dotdot-inside", "/sub/a\\..\\..\\x"),
    ("prefix-subway", "/subway"),
    ("prefix-sub-dotdot", "/sub.."),
    ("prefix-sub-dotdot-x", "/sub../x"),
    ("prefix-pct-2f-dotdot", "/sub%2f.."),
    ("prefix-pct-2F-dotdot-x", "/sub%2F..%2Fx"),
    ("prefix-pct-2f-x", "/sub%2fx"),
    ("prefix-pct-2F-in-route", "/deep%2Fsub/x"),
    ("prefix-pct-2f-in-route-exact", "/deep%2fsub"),
    ("prefix-pct-2F-in-route-dotdot", "/deep%2Fsub%2F..%2F..%2Fx"),
    ("prefix-dotdot-into-route", "/deep/x/../sub/y"),
    ("query-dotdot", "/sub/x?../../y"),
    ("query-at-host", "/sub/x?@127.0.0.1:{trap}/"),
    ("fragment-dotdot", "/sub/x#/../../y"),
]


# Each routing test runs once per target kind; separate parametrize marks (not one product
# table) let pytest run all tests of one kind against one gunicorn before the next.
BOTH_TARGETS = pytest.mark.parametrize("routing", list(TARGET_PATHS), indirect=True, scope="module")


@BOTH_TARGETS
@pytest.mark.parametrize("template", [pytest.param(template, id=name) for name, template in ROUTING_VECTORS])
def test_request_target_never_leaves_the_target(routing, up, trap, template):
    target = template.format(trap=trap.port, up=up.port)
    reply = raw_exchange(routing.server.port, http_request("GET", target))
    assert_stayed_inside(routing, up, trap, reply)


@BOTH_TARGETS
@pytest.mark.parametrize(
    ("method", "target"),
    [
        pytest.param("CONNECT", "127.0.0.1:{trap}", id="connect-authority-form"),
        pytest.param("CONNECT", "/sub/x", id="connect-route"),
        pytest.param("OPTIONS", "*", id="options-asterisk-form"),
        pytest.param("TRACE", "/sub/x", id="trace-route"),
    ],
)
def test_tunnel_and_reflecting_methods_never_leave_the_target(routing, up, trap, method, target):
    reply = raw_exchange(routing.server.port, http_request(method, target.format(trap=trap.port)))
    assert_stayed_inside(routing, up, trap, reply)
    # CONNECT would make a tunnel and TRACE reflect the injected secret: neither is served.
    assert up.requests == [], [(r.method, r.target) for r in up.requests]


# urllib3's HTTPConnectionPool.urlopen would re-encode every request-target (upper-case
# escapes; double-encode every "%" of a component holding one invalid escape): these
# prove the proxy's targets reach the upstream byte for byte (proxy_app/upstream.py).
# (accepted request-target, the request-target the upstream must see below the target's path)
EXACT_VECTORS = [
    pytest.param("/sub/%252e%252e/x", "/%252e%252e/x", id="double-encoded-dots-kept"),
    pytest.param("/sub/@127.0.0.1:{trap}", "/@127.0.0.1:{trap}", id="at-host-kept-as-a-segment"),
    pytest.param("/sub//127.0.0.1:{trap}/x", "/127.0.0.1:{trap}/x", id="leading-slashes-collapsed"),
    pytest.param("/sub/a%2Fb?q=%2F&q=%3F", "/a%2Fb?q=%2F&q=%3F", id="upper-case-encodings-kept"),
    pytest.param(
        "/sub/a%2fb", "/a%2fb", id="lower-case-encoded-slash-kept",
    ),
    pytest.param(
        "/sub/x?q=%2fa%3d", "/x?q=%2fa%3d", id="lower-case-query-kept-byte-for-byte",
    ),
    pytest.param(
        "/sub/%c0%ae%c0%ae/x", "/%c0%ae%c0%ae/x", id="overlong-utf8-dots-kept",
    ),
    pytest.param(
        "/sub/a%2Fb/%zz", "/a%2Fb/%zz", id="stray-percent-in-path-kept",
    ),
    pytest.param(
        "/sub/x?q=%2F&r=%zz", "/x?q=%2F&r=%zz", id="stray-percent-in-query-kept-byte-for-byte",
    ),
]


@BOTH_TARGETS
@pytest.mark.parametrize(("template", "below"), EXACT_VECTORS)
def test_accepted_target_reaches_the_upstream_byte_for_byte(routing, up, trap, template, below):
    """The raw rest and query, appended below the target's path, unchanged."""
    reply = raw_exchange(routing.server.port, http_request("GET", template.format(trap=trap.port)))
    assert_stayed_inside(routing, up, trap, reply)
    assert reply.status == 200
    assert up.requests[0].target == routing.base + below.format(trap=trap.port)


# (headers as (name, value) pairs, or a "Host" among them replacing the default Host)
HEADER_VECTORS = [
    ("host-spoofed", [("Host", "127.0.0.1:{trap}")]),
    ("host-duplicate", [("Host", "proxy.test"), ("Host", "127.0.0.1:{trap}")]),
    ("host-userinfo", [("Host", "proxy.test@127.0.0.1:{trap}")]),
    ("x-forwarded-host", [("X-Forwarded-Host", "127.0.0.1:{trap}")]),
    ("x-forwarded-host-and-proto", [("X-Forwarded-Host", "127.0.0.1:{trap}"), ("X-Forwarded-Proto", "https")]),
    ("forwarded", [("Forwarded", "host=127.0.0.1:{trap};proto=http")]),
    ("x-pass-host", [("X-Pass-Host", "127.0.0.1:{trap}")]),
    ("x-pass-x-forwarded-host", [("X-Pass-X-Forwarded-Host", "127.0.0.1:{trap}")]),
    ("httpoxy-proxy", [("Proxy", "http://127.0.0.1:{trap}")]),
    ("x-pass-proxy", [("X-Pass-Proxy", "http://127.0.0.1:{trap}")]),
    ("proxy-authorization", [("Proxy-Authorization", "Basic " + NETRC_B64)]),
    ("x-original-url", [("X-Original-URL", "/../../x"), ("X-Rewrite-URL", "//127.0.0.1:{trap}/x")]),
]


@BOTH_TARGETS
@pytest.mark.parametrize("route", ["/sub", "/fwd"], ids=["forward_headers-off", "forward_headers-on"])
@pytest.mark.parametrize("headers", [pytest.param(headers, id=name) for name, headers in HEADER_VECTORS])
def test_host_changing_headers_never_move_the_request(routing, up, trap, route, headers):
    headers = [(name, value.format(trap=trap.port)) for name, value in headers]
    own_host = any(name.lower() == "host" for name, _ in headers)
    request = http_request("GET", f"{route}/x", headers, host=None if own_host else "proxy.test")
    reply = raw_exchange(routing.server.port, request)
    assert_stayed_inside(routing, up, trap, reply)
    for r in up.requests:
        assert r.path == routing.base + "/x", r.target


@BOTH_TARGETS
def test_routing_log_carries_no_secret(routing, up):
    # Runs after the vectors of each routing server (pytest groups tests by module param).
    reply = raw_exchange(routing.server.port, http_request("GET", "/sub/%2e%2e/x"))
    assert reply.status is not None and reply.status < 500
    assert_clean_log(routing.server)


# --------------------------------------------------------------------------
# Credential isolation
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_env(trap, tmp_path_factory):
    """Proxy variables aimed at the trap and a .netrc for 127.0.0.1, as a careless VM has."""
    home = tmp_path_factory.mktemp("home")
    netrc = home / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {NETRC_USER} password {NETRC_PASS}\n")
    netrc.chmod(0o600)
    env = subprocess_env()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[name] = trap.url
    env.update({"NO_PROXY": "", "no_proxy": "", "HOME": str(home), "NETRC": str(netrc)})
    return env


@pytest.fixture(scope="module")
def cred(up, trap, hostile_env, tmp_path_factory):
    config = config_for(
        {"path": "/secret", "target": up.url + "/s", "include_subpath": True, "headers": AUTH_HEADER},
        {"path": "/open", "target": up.url + "/open", "include_subpath": True},
        {"path": "/jar-on", "target": up.url + "/jar", "include_subpath": True, "forward_headers": True, "headers": AUTH_HEADER},
        {"path": "/jar-off", "target": up.url + "/jar", "include_subpath": True, "headers": AUTH_HEADER},
        {"path": "/locked", "target": up.url + "/locked", "auth": True, "headers": AUTH_HEADER},
        {"path": "/getonly", "target": up.url + "/g", "methods": ["GET"], "headers": AUTH_HEADER},
        {"path": "/slow", "target": up.url + "/slow", "timeout": 0.5, "headers": AUTH_HEADER},
        {"path": "/broken", "target": up.url + "/broken", "headers": AUTH_HEADER},
    )
    path = write_config(tmp_path_factory.mktemp("cred"), config)
    env = {**hostile_env, "DETAILED_DEBUG": "1"}
    # One worker: every caller shares the one requests.Session (and its cookie jar).
    with run_gunicorn(path, env, workers=1, threads=4) as server:
        yield server


def test_the_hostile_environment_would_divert_a_default_requests_client(monkeypatch, hostile_env, up, trap):
    """Control: the fixture's environment is effective, so the next tests prove something."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "NO_PROXY", "no_proxy", "HOME", "NETRC"):
        monkeypatch.setenv(name, hostile_env[name])
    assert requests.utils.get_netrc_auth(up.url + "/open") == (NETRC_USER, NETRC_PASS)
    assert requests.utils.get_environ_proxies(up.url + "/open").get("http") == trap.url


@pytest.mark.parametrize(
    ("target", "expected_auth"),
    [
        ("/open", []),
        ("/open/x", []),
        ("/secret", [BEARER]),
        ("/secret/x", [BEARER]),
    ],
    ids=["open-exact", "open-subpath", "secret-exact", "secret-subpath"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_env_proxies_and_netrc_are_never_used(cred, up, trap, target, expected_auth, method):
    body = b'{"q":1}' if method == "POST" else b""
    reply = raw_exchange(cred.port, http_request(method, target, [("Content-Type", "application/json")], body))
    assert reply.status == 200, reply.body
    assert_trap_untouched(trap)
    (seen,) = up.requests
    assert seen.target.startswith("/"), "sent in absolute form, as to a proxy"
    assert seen.header_all("Authorization") == expected_auth
    assert seen.header("Proxy-Authorization") is None
    head = seen.raw_head.decode("latin-1")
    assert NETRC_B64 not in head and NETRC_USER not in head and NETRC_PASS not in head


@pytest.mark.parametrize("route", ["/jar-on", "/jar-off"], ids=["forward_headers-on", "forward_headers-off"])
def test_upstream_cookie_is_never_replayed_to_another_caller(cred, up, trap, route):
    up.route(
        "/jar/login",
        fixed(
            200,
            [("Set-Cookie", "session=victim; Path=/"), ("Set-Cookie", "sid=victim2; Path=/; Domain=127.0.0.1"), ("Content-Length", "2")],
            b"ok",
        ),
    )
    a = raw_exchange(cred.port, http_request("GET", f"{route}/login"))
    assert a.status == 200
    assert a.header_all("Set-Cookie") == ["session=victim; Path=/", "sid=victim2; Path=/; Domain=127.0.0.1"]
    # Caller B, on new connections, to the same route, the sibling route and another endpoint.
    later = [f"{route}/profile", f"{route}/login", "/jar-on/profile", "/jar-off/profile", "/secret/x", "/open/x"]
    for target in later:
        b = raw_exchange(cred.port, http_request("GET", target))
        assert b.status == 200, (target, b.body)
    own = raw_exchange(cred.port, http_request("GET", f"{route}/profile", [("Cookie", "mine=1")]))
    assert own.status == 200
    seen = up.requests
    assert len(seen) == 2 + len(later)
    for r in seen[1:-1]:
        assert r.header_all("Cookie") == [], (r.target, r.headers)
        assert b"victim" not in r.raw_head, r.target
    # B's own cookie: forwarded as it is with forward_headers, not at all without.
    assert seen[-1].header_all("Cookie") == (["mine=1"] if route == "/jar-on" else [])
    assert_trap_untouched(trap)


REDIRECT_BODY = b"<html>moved <a href='elsewhere'>here</a></html>\n\x00\xff" + bytes(range(256))
LOCATIONS = {
    "same-host": "{up}/s/elsewhere",
    "relative": "/s/elsewhere",
    "other-host": "{trap}/steal?k=v",
}


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("where", list(LOCATIONS))
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_returned_never_followed(cred, up, trap, status, where, method):
    location = LOCATIONS[where].format(up=up.url, trap=trap.url)
    path = f"/s/r/{status}/{where}"
    headers = [("Location", location), ("Content-Type", "text/html"), ("Content-Length", str(len(REDIRECT_BODY)))]
    up.route(path, fixed(status, headers, REDIRECT_BODY))
    body = b'{"payload":true}' if method == "POST" else b""
    reply = raw_exchange(cred.port, http_request(method, f"/secret/r/{status}/{where}", [("Content-Type", "application/json")], body))
    assert reply.status == status
    assert reply.header_all("Location") == [location]
    assert reply.body == REDIRECT_BODY
    assert reply.complete
    assert [(r.method, r.path) for r in up.requests] == [(method, path)]
    assert up.requests[0].header_all("Authorization") == [BEARER]
    assert_trap_untouched(trap)


def test_master_key_never_reaches_the_upstream(cred, up, trap):
    for carrier in ([("Authorization", f"Bearer {MASTER_KEY}")], [("x-litellm-api-key", MASTER_KEY)]):
        reply = raw_exchange(cred.port, http_request("GET", "/locked", carrier))
        assert reply.status == 200, reply.body
    assert len(up.requests) == 2
    for r in up.requests:
        assert MASTER_KEY.encode() not in r.raw_head
        assert r.header_all("Authorization") == [BEARER]
    assert_trap_untouched(trap)


# (id, method, target, extra headers, body, expected status, proxy-made JSON?, reaches upstream?)
ERROR_CASES = [
    ("404-unknown-path", "GET", "/nowhere", [], b"", 404, True, False),
    ("404-prefix-no-boundary", "GET", "/secretx", [], b"", 404, True, False),
    ("404-subpath-not-enabled", "GET", "/locked/x", [], b"", 404, True, False),
    ("405-method", "DELETE", "/getonly", [], b"", 405, True, False),
    ("400-dot-segment", "GET", "/secret/%2e%2e/x", [], b"", 400, True, False),
    ("400-bad-content-length", "POST", "/secret/x", [("Content-Length", "abc")], b"abc", 400, False, False),
    ("400-cl-and-te", "POST", "/secret/x", [("Content-Length", "3"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n", 400, False, False),
    ("401-no-key", "GET", "/locked", [], b"", 401, True, False),
    ("401-wrong-key-bearer", "GET", "/locked", [("Authorization", f"Bearer {CALLER_WRONG_KEY}")], b"", 401, True, False),
    ("401-wrong-key-litellm-header", "GET", "/locked", [("x-litellm-api-key", CALLER_WRONG_KEY)], b"", 401, True, False),
    ("401-master-key-prefix", "GET", "/locked", [("Authorization", f"Bearer {MASTER_KEY[:-1]}")], b"", 401, True, False),
    ("502-upstream-closed", "GET", "/broken", [], b"", 502, True, True),
    ("504-upstream-slow", "GET", "/slow", [], b"", 504, True, True),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "status", "proxy_json", "reaches_upstream"),
    [pytest.param(*case[1:], id=case[0]) for case in ERROR_CASES],
)
def test_error_answers_and_log_carry_no_secret(cred, up, trap, method, target, headers, body, status, proxy_json, reaches_upstream):
    up.route("/broken", close_without_response())
    up.route("/slow", stall(3.0))
    reply = raw_exchange(cred.port, http_request(method, target, headers, body))
    assert reply.status == status, (reply.status, reply.body[:300])
    text = reply.raw.decode("latin-1")
    for value in (SECRET, MASTER_KEY, CALLER_WRONG_KEY, "Traceback", NETRC_PASS):
        assert value not in text, f"{value!r} in the {status} answer"
    if proxy_json:
        error = json.loads(reply.body)["error"]
        assert error["code"] == str(status) and error["param"] is None
    assert len(up.requests) == (1 if reaches_upstream else 0), [(r.method, r.target) for r in up.requests]
    assert_trap_untouched(trap)
    assert_clean_log(cred)


def test_cred_log_carries_no_secret_at_the_end(cred, trap):
    # The whole DETAILED_DEBUG log of this server, after every test above has run.
    assert_clean_log(cred)
    assert_trap_untouched(trap)
