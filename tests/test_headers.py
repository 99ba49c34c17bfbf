"""Table-driven tests of the pure header rules in proxy_app/headers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import proxy_app.headers
from proxy_app.headers import InvalidUpstreamHeaders
from proxy_app.headers import caller_headers
from proxy_app.headers import client_hop_names
from proxy_app.headers import connection_tokens
from proxy_app.headers import is_token
from proxy_app.headers import outbound_headers
from proxy_app.headers import response_headers

P = pytest.param
ROOT = Path(__file__).resolve().parent.parent

# Caller headers that only pass with forward_headers: true.
OTHER = [("User-Agent", "curl/8"), ("Cookie", "c=1"), ("X-Custom", "v"), ("Authorization", "Bearer caller")]
ALWAYS = [("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Accept", "text/event-stream"), ("Accept-Encoding", "br")]


def out(caller, configured=(), forward_all=False, peer=None, consumed=(), trust_front=False):
    """outbound_headers with configured_names derived as config.py does, result sorted."""
    configured = tuple(configured)
    names = frozenset(name.lower() for name, _ in configured)
    result = outbound_headers(list(caller), configured, names, forward_all, peer, frozenset(consumed), trust_front)
    return sorted(result)


# -- outbound_headers ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # configured headers win, case-insensitively
        P(
            dict(caller=[("authorization", "Bearer caller")], configured=[("Authorization", "Bearer up")], forward_all=True),
            [("Authorization", "Bearer up")],
            id="configured-wins-over-caller-other-case",
        ),
        P(
            dict(caller=[("AUTHORIZATION", "Bearer caller")], configured=[("authorization", "Bearer up")], forward_all=True),
            [("authorization", "Bearer up")],
            id="configured-lower-wins-over-caller-upper",
        ),
        P(
            dict(caller=[("Content-Type", "text/plain")], configured=[("content-type", "application/json")]),
            [("content-type", "application/json")],
            id="configured-wins-over-always-forwarded",
        ),
        P(
            dict(caller=[("x-pass-X-Api-Version", "1")], configured=[("X-Api-Version", "2")], forward_all=True),
            [("X-Api-Version", "2")],
            id="configured-wins-over-x-pass",
        ),
        P(
            dict(caller=[("X-PASS-X-API-VERSION", "1")], configured=[("x-api-version", "2")]),
            [("x-api-version", "2")],
            id="configured-wins-over-x-pass-upper-case",
        ),
        P(
            dict(caller=[], configured=[("Authorization", "Bearer up"), ("X-Extra", "1")]),
            [("Authorization", "Bearer up"), ("X-Extra", "1")],
            id="configured-sent-without-caller-headers",
        ),
        # without forward_headers
        P(dict(caller=ALWAYS + OTHER), sorted(ALWAYS), id="default-only-body-and-accept-headers"),
        P(
            dict(caller=[("content-type", "a/b"), ("ACCEPT", "*/*")]),
            [("ACCEPT", "*/*"), ("content-type", "a/b")],
            id="default-always-forwarded-any-case",
        ),
        P(dict(caller=[("X-Forwarded-For", "1.2.3.4")], peer="10.0.0.1"), [], id="default-no-x-forwarded-for"),
        P(dict(caller=[], peer="10.0.0.1"), [], id="default-peer-not-added"),
        P(dict(caller=[("Content-Length", "5"), ("Host", "evil")]), [], id="default-no-framing-or-host"),
        P(
            dict(caller=[*OTHER, ("X-Pass-Anthropic-Beta", "b")]),
            [("Anthropic-Beta", "b")],
            id="default-x-pass-passes",
        ),
        # x-pass-<name>
        P(dict(caller=[("x-pass-anthropic-version", "2023")]), [("anthropic-version", "2023")], id="x-pass-lower-case"),
        P(dict(caller=[("X-Pass-OpenAI-Organization", "org")]), [("OpenAI-Organization", "org")], id="x-pass-rest-case-kept"),
        P(dict(caller=[("X-PASS-Foo", "1")]), [("Foo", "1")], id="x-pass-prefix-any-case"),
        P(
            dict(caller=[("X-Pass-Foo", "1"), ("X-Bar", "2")], forward_all=True),
            [("Foo", "1"), ("X-Bar", "2")],
            id="x-pass-with-forward-headers-renamed-not-copied",
        ),
        P(dict(caller=[("X-Pass-", "v")], forward_all=True), [], id="x-pass-empty-name-dropped"),
        P(dict(caller=[("X-Pass-X-My-Key", "v")], consumed={"x-my-key"}), [], id="x-pass-onto-consumed-refused"),
        # with forward_headers
        P(dict(caller=ALWAYS + OTHER, forward_all=True), sorted(ALWAYS + OTHER), id="forward-passes-everything-else"),
        P(
            dict(caller=[("Connection", "keep-alive, X-Hop, x-other"), ("X-Hop", "1"), ("X-OTHER", "2"), ("X-Keep", "3")], forward_all=True),
            [("X-Keep", "3")],
            id="forward-connection-listed-names-dropped",
        ),
        P(
            dict(caller=[("Connection", "X-A"), ("Connection", "x-b"), ("X-A", "1"), ("X-B", "2"), ("X-Keep", "3")], forward_all=True),
            [("X-Keep", "3")],
            id="forward-several-connection-headers",
        ),
        P(
            dict(caller=[("Authorization", "Bearer sk-master"), ("X-Keep", "1")], forward_all=True, consumed={"authorization"}),
            [("X-Keep", "1")],
            id="forward-consumed-authorization-dropped",
        ),
        P(
            dict(caller=[("X-My-Key", "sk-master"), ("X-Keep", "1")], forward_all=True, consumed={"x-my-key"}),
            [("X-Keep", "1")],
            id="forward-consumed-custom-key-header-dropped",
        ),
        # X-Forwarded-For
        P(
            dict(caller=[("X-Forwarded-For", "1.1.1.1")], forward_all=True, peer="10.0.0.1"),
            [("X-Forwarded-For", "1.1.1.1, 10.0.0.1")],
            id="xff-peer-appended",
        ),
        P(
            dict(caller=[("x-forwarded-for", "1.1.1.1, 2.2.2.2")], forward_all=True, peer="10.0.0.1"),
            [("X-Forwarded-For", "1.1.1.1, 2.2.2.2, 10.0.0.1")],
            id="xff-chain-peer-appended",
        ),
        P(
            dict(caller=[("X-Keep", "1")], forward_all=True, peer="10.0.0.1"),
            [("X-Forwarded-For", "10.0.0.1"), ("X-Keep", "1")],
            id="xff-set-to-peer",
        ),
        P(
            dict(caller=[("X-Forwarded-For", "1.1.1.1")], forward_all=True, peer=None),
            [],
            id="xff-without-peer-not-trusted-as-is",
        ),
    ],
)
def test_outbound_headers(kwargs, expected):
    assert out(**kwargs) == expected


PASS_REFUSED = [
    "authorization",
    "Authorization",
    "api-key",
    "x-api-key",
    "X-Goog-Api-Key",
    "ocp-apim-subscription-key",
    "host",
    "content-length",
    "accept-encoding",
    "x-amz-date",
    "X-Amz-Security-Token",
    "x-amz-content-sha256",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "proxy",
    "proxy-authorization",
    "x-litellm-api-key",
    "x-forwarded-for",
    "x-forwarded-host",
    "forwarded",
    "http2-settings",
    "x-client-connection",
]


@pytest.mark.parametrize("forward_all", [P(False, id="default"), P(True, id="forward")])
@pytest.mark.parametrize("name", PASS_REFUSED)
def test_x_pass_refused(name, forward_all):
    caller = [(f"x-pass-{name}", "smuggled"), ("X-Pass-Ok", "1")]
    assert out(caller, forward_all=forward_all) == [("Ok", "1")]


@pytest.mark.parametrize("forward_all", [P(False, id="default"), P(True, id="forward")])
@pytest.mark.parametrize("name", ["authorization", "x-api-key", "x-amz-date"])
def test_x_pass_refused_keeps_configured(name, forward_all):
    configured = [("Authorization", "Bearer up")]
    caller = [(f"X-Pass-{name}", "smuggled")]
    assert out(caller, configured, forward_all=forward_all) == [("Authorization", "Bearer up")]


NEVER_FORWARDED = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Host",
    "Content-Length",
    "Proxy",
    "Expect",
    "x-litellm-api-key",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "Forwarded",
    "HTTP2-Settings",
    "X-Client-Connection",
]


@pytest.mark.parametrize("trust_front", [P(False, id="untrusted"), P(True, id="trusted")])
@pytest.mark.parametrize("forward_all", [P(False, id="default"), P(True, id="forward")])
@pytest.mark.parametrize("name", [*NEVER_FORWARDED, *(n.lower() for n in NEVER_FORWARDED if n != n.lower())])
def test_never_forwarded(name, forward_all, trust_front):
    caller = [(name, "x"), ("Content-Type", "a/b")]
    assert out(caller, forward_all=forward_all, trust_front=trust_front) == [("Content-Type", "a/b")]


# -- client_hop_names: the caller's Connection, directly or as relayed by the front ---------

@pytest.mark.parametrize(
    ("caller", "trust_front", "expected"),
    [
        P([("Connection", "close, X-Hop")], False, {"close", "x-hop"}, id="own-connection"),
        P([("Connection", "close, X-Hop")], True, {"close", "x-hop"}, id="own-connection-trusted-too"),
        P([("Connection", "x-a"), ("connection", "X-B")], False, {"x-a", "x-b"}, id="own-several-lines"),
        P([("X-Client-Connection", "keep-alive, X-Hop")], False, set(), id="relayed-untrusted-ignored"),
        P([("X-Client-Connection", "keep-alive, X-Hop")], True, {"keep-alive", "x-hop"}, id="relayed-trusted"),
        P([("x-CLIENT-connection", "X-Hop")], True, {"x-hop"}, id="relayed-name-any-case"),
        P([("Connection", "x-a"), ("X-Client-Connection", "x-b")], True, {"x-a", "x-b"}, id="own-and-relayed"),
        P([("Connection", "x-a"), ("X-Client-Connection", "x-b")], False, {"x-a"}, id="own-and-relayed-untrusted"),
        P(
            [("X-Client-Connection", "X-Forwarded-For, x-real-ip, X-Hop")],
            True,
            {"x-hop"},
            id="relayed-never-names-the-fronts-own-headers",
        ),
        P(
            [("Connection", "X-Forwarded-For, X-Real-IP")],
            False,
            {"x-forwarded-for", "x-real-ip"},
            id="own-connection-may-name-them-gunicorn-alone",
        ),
        P([("X-Client-Connection", "")], True, set(), id="relayed-empty"),
        P([("X-Client-Connection", " , ,")], True, set(), id="relayed-only-commas"),
        P([("X-Hop", "1")], True, set(), id="none"),
        P([], True, set(), id="empty"),
    ],
)
def test_client_hop_names(caller, trust_front, expected):
    assert client_hop_names(caller, trust_front) == frozenset(expected)


# Behind the site: nginx removed Connection and relayed its value in X-Client-Connection.
BEHIND_FRONT = [
    ("X-Client-Connection", "keep-alive, X-Client-Hop, HTTP2-Settings, X-Forwarded-For, X-Real-IP"),
    ("X-Client-Hop", "1"),
    ("X-Real-Ip", "203.0.113.7"),
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Keep", "2"),
]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        P(
            dict(caller=BEHIND_FRONT, forward_all=True, peer="127.0.0.1", trust_front=True),
            [("X-Forwarded-For", "203.0.113.7, 127.0.0.1"), ("X-Keep", "2"), ("X-Real-Ip", "203.0.113.7")],
            id="trusted-drops-named-keeps-front-set",
        ),
        P(
            dict(caller=BEHIND_FRONT, forward_all=True, peer="127.0.0.1", trust_front=False),
            [("X-Client-Hop", "1"), ("X-Forwarded-For", "203.0.113.7, 127.0.0.1"), ("X-Keep", "2"), ("X-Real-Ip", "203.0.113.7")],
            id="untrusted-ignores-it-and-never-forwards-it",
        ),
        P(
            dict(
                caller=[("X-Client-Connection", "authorization, x-api-version"), ("X-Api-Version", "1")],
                configured=[("Authorization", "Bearer up"), ("X-Api-Version", "2")],
                forward_all=True,
                trust_front=True,
            ),
            [("Authorization", "Bearer up"), ("X-Api-Version", "2")],
            id="trusted-cannot-remove-configured-headers",
        ),
        P(
            dict(caller=[("X-Client-Connection", "anthropic-beta"), ("X-Pass-Anthropic-Beta", "b"), ("X-Pass-Ok", "1")], trust_front=True),
            [("Ok", "1")],
            id="trusted-named-header-not-smuggled-via-x-pass",
        ),
        P(
            dict(caller=[("X-Client-Connection", "content-type"), ("Content-Type", "a/b"), ("Accept", "*/*")], trust_front=True),
            [("Accept", "*/*")],
            id="trusted-applies-without-forward-headers",
        ),
    ],
)
def test_outbound_headers_behind_the_front(kwargs, expected):
    assert out(**kwargs) == expected


@pytest.mark.parametrize("setting", [P(False, id="off"), P(True, id="on")])
def test_outbound_headers_default_follows_the_setting(monkeypatch, setting):
    monkeypatch.setattr(proxy_app.headers, "TRUST_CLIENT_CONNECTION", setting)
    caller = [("X-Client-Connection", "x-hop"), ("X-Hop", "1"), ("X-Keep", "2")]
    result = outbound_headers(caller, (), frozenset(), True, None)
    assert result == ([("X-Keep", "2")] if setting else [("X-Hop", "1"), ("X-Keep", "2")])


@pytest.mark.parametrize(
    ("value", "expected"),
    [P(None, False, id="unset"), P("", False, id="empty"), P("0", False, id="zero"), P("1", True, id="one"), P("true", True, id="true")],
)
def test_trust_setting_is_read_from_the_environment(value, expected):
    env = {k: v for k, v in os.environ.items() if k != "PROXY_TRUST_CLIENT_CONNECTION"}
    if value is not None:
        env["PROXY_TRUST_CLIENT_CONNECTION"] = value
    code = "import proxy_app.headers as h; print(h.TRUST_CLIENT_CONNECTION)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(expected)


@pytest.mark.parametrize("forward_all", [P(False, id="default"), P(True, id="forward")])
def test_consumed_x_pass_key_header_not_forwarded(forward_all):
    caller = [("X-Pass-Key", "sk-master"), ("X-Keep", "1")]
    result = out(caller, forward_all=forward_all, consumed={"x-pass-key"})
    assert all("sk-master" not in value for _, value in result)


# -- caller_headers ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        P(
            {"HTTP_X_PASS_ANTHROPIC_BETA": "b", "HTTP_ACCEPT": "*/*"},
            [("Accept", "*/*"), ("X-Pass-Anthropic-Beta", "b")],
            id="http-keys-title-cased",
        ),
        P(
            {"CONTENT_TYPE": "application/json", "CONTENT_LENGTH": "12"},
            [("Content-Length", "12"), ("Content-Type", "application/json")],
            id="content-type-and-length",
        ),
        P({"CONTENT_TYPE": "", "CONTENT_LENGTH": ""}, [], id="empty-content-headers-skipped"),
        P(
            {
                "REQUEST_METHOD": "POST",
                "PATH_INFO": "/x",
                "QUERY_STRING": "a=1",
                "RAW_URI": "/x?a=1",
                "REMOTE_ADDR": "10.0.0.1",
                "SERVER_NAME": "proxy",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "wsgi.input": object(),
                "wsgi.url_scheme": "http",
                "HTTP_HOST": "proxy:4000",
            },
            [("Host", "proxy:4000")],
            id="non-header-keys-ignored",
        ),
        P({"HTTP_X_B3_TRACEID": "abc"}, [("X-B3-Traceid", "abc")], id="digits-in-name"),
        P({"HTTP_X_LITELLM_API_KEY": "sk"}, [("X-Litellm-Api-Key", "sk")], id="litellm-key"),
        P({"HTTP_COOKIE": "a=1; b=2"}, [("Cookie", "a=1; b=2")], id="value-untouched"),
        P({}, [], id="empty"),
    ],
)
def test_caller_headers(environ, expected):
    assert sorted(caller_headers(environ)) == expected


# -- response_headers ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        P(
            [("Set-Cookie", "a=1"), ("Content-Type", "text/plain"), ("Set-Cookie", "b=2"), ("set-cookie", "c=3")],
            [("Set-Cookie", "a=1"), ("Content-Type", "text/plain"), ("Set-Cookie", "b=2"), ("set-cookie", "c=3")],
            id="repeated-set-cookie-separate-in-order",
        ),
        P(
            [("Link", "<a>; rel=next"), ("Link", "<b>; rel=prev")],
            [("Link", "<a>; rel=next"), ("Link", "<b>; rel=prev")],
            id="repeated-link-separate-in-order",
        ),
        P(
            [("Content-Length", "42"), ("Content-Encoding", "gzip"), ("Content-Type", "application/json")],
            [("Content-Length", "42"), ("Content-Encoding", "gzip"), ("Content-Type", "application/json")],
            id="content-length-and-encoding-kept",
        ),
        P(
            [("Connection", "close, X-Hop"), ("X-Hop", "1"), ("x-hop", "2"), ("X-Keep", "3")],
            [("X-Keep", "3")],
            id="connection-listed-names-dropped",
        ),
        P(
            [("Location", "https://elsewhere/x"), ("Retry-After", "3")],
            [("Location", "https://elsewhere/x"), ("Retry-After", "3")],
            id="location-kept",
        ),
        P([("X-Only", "1")], [("X-Only", "1")], id="no-content-type-invented"),
        P([], [], id="empty"),
    ],
)
def test_response_headers(upstream, expected):
    assert response_headers(upstream) == expected


HOP_BY_HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "HTTP2-Settings"]


@pytest.mark.parametrize("name", [*HOP_BY_HOP, *(n.lower() for n in HOP_BY_HOP)])
def test_response_headers_hop_by_hop_dropped(name):
    value = "chunked" if name.lower() == "transfer-encoding" else "x"
    assert response_headers([("X-A", "1"), (name, value), ("X-B", "2")]) == [("X-A", "1"), ("X-B", "2")]


@pytest.mark.parametrize(
    "head",
    [
        P([("Content-Length", "3"), ("Transfer-Encoding", "chunked")], id="cl-and-te"),
        P([("Transfer-Encoding", "xchunked")], id="unknown-coding"),
        P([("Transfer-Encoding", "gzip, chunked")], id="coding-list"),
        P([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], id="te-twice"),
        P([("Content-Length", "abc")], id="cl-not-a-number"),
        P([("Content-Length", "-1")], id="cl-negative"),
        P([("Content-Length", "5"), ("Content-Length", "6")], id="cl-differing-lines"),
        P([("Content-Length", "5, 6")], id="cl-differing-list"),
        P([("X-A", "a\x00b")], id="nul-in-value"),
        P([("X-A", "a\rb")], id="cr-in-value"),
        P([("X A", "1")], id="space-in-name"),
    ],
)
def test_response_headers_refuse_what_cannot_be_relayed_faithfully(head):
    with pytest.raises(InvalidUpstreamHeaders):
        response_headers(head)


def test_response_headers_fold_identical_content_lengths_into_one_line():
    head = [("Content-Length", "5"), ("X-A", "1"), ("content-length", "5, 5")]
    assert response_headers(head) == [("Content-Length", "5"), ("X-A", "1")]


def test_response_headers_accepts_iterator():
    assert response_headers(iter([("Set-Cookie", "a"), ("Connection", "x-a"), ("X-A", "1"), ("Set-Cookie", "b")])) == [
        ("Set-Cookie", "a"),
        ("Set-Cookie", "b"),
    ]


# -- connection_tokens ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("values", "expected"),
    [
        P(["close"], {"close"}, id="single"),
        P(["keep-alive, Upgrade"], {"keep-alive", "upgrade"}, id="comma-list-lower-cased"),
        P(["  X-Foo ,  ,x-bar,"], {"x-foo", "x-bar"}, id="whitespace-and-empty-items"),
        P(["a", "B, c"], {"a", "b", "c"}, id="several-values"),
        P([], set(), id="none"),
        P([""], set(), id="empty-value"),
        P([", ,"], set(), id="only-commas"),
    ],
)
def test_connection_tokens(values, expected):
    assert connection_tokens(values) == frozenset(expected)


# -- is_token ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    [
        P("Content-Type", id="content-type"),
        P("x-pass-foo", id="lower-case"),
        P("X_Custom", id="underscore"),
        P("a", id="one-char"),
        P("X-B3-TraceId", id="digits"),
        P("!#$%&'*+-.^_`|~09azAZ", id="all-tchar-symbols"),
    ],
)
def test_is_token_valid(name):
    assert is_token(name) is True


@pytest.mark.parametrize(
    "name",
    [
        P("", id="empty"),
        P("X Foo", id="space"),
        P(" X-Foo", id="leading-space"),
        P("X:Foo", id="colon"),
        P("X-Foo:", id="trailing-colon"),
        P("Foo\r", id="carriage-return"),
        P("Fo\no", id="inner-newline"),
        P("\n", id="only-newline"),
        P("Foo\x00", id="nul"),
        P("a\tb", id="tab"),
        P("Fóo", id="non-ascii"),
        P("(a)", id="parentheses"),
        P("a/b", id="slash"),
        P("a@b", id="at-sign"),
        P('"a"', id="quotes"),
        P("{a}", id="braces"),
        P("a,b", id="comma"),
        P("Foo\n", id="trailing-newline"),
    ],
)
def test_is_token_invalid(name):
    assert is_token(name) is False
