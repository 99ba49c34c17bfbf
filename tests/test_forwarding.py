"""The proxy over the wire: Flask's test client in front, a recording upstream behind.

Each test asserts on what the upstream received (method, raw target, header lines,
body bytes) and on what the caller got back, byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from tests.conftest import MASTER_KEY
from tests.conftest import SECRET
from tests.upstream import close_without_response
from tests.upstream import die_mid_body
from tests.upstream import fixed
from tests.upstream import pattern_bytes
from tests.upstream import stall


def endpoint(upstream, path="/p", target_path="/t", **fields):
    return {"path": path, "target": upstream.url + target_path, **fields}


def only(upstream):
    (received,) = upstream.wait_for_requests(1)
    return received


# -- URL: sub-path joining -------------------------------------------------------------

@pytest.mark.parametrize(
    ("target_path", "request_path", "expected"),
    [
        ("/base", "/sub", "/base"),
        ("/base", "/sub/", "/base/"),
        ("/base", "/sub/a/b", "/base/a/b"),
        ("/base/", "/sub/a", "/base/a"),
        ("/base", "/sub/a/b/", "/base/a/b/"),
        ("/base", "/sub//a", "/base/a"),
        ("", "/sub//evil.example/x", "/evil.example/x"),
        ("/base", "/sub/c%2Fd", "/base/c%2Fd"),
        ("/base", "/sub/e%3Fq", "/base/e%3Fq"),
        ("/base", "/sub/h%23frag", "/base/h%23frag"),
        ("/base", "/sub/sp%20ace", "/base/sp%20ace"),
        ("/base", "/sub/%252e%252e/x", "/base/%252e%252e/x"),
        ("/base?fixed=1", "/sub/a", "/base/a?fixed=1"),
    ],
)
def test_subpath_joins_raw_rest_onto_target_path(upstream, make_client, target_path, request_path, expected):
    client = make_client(endpoint(upstream, "/sub", target_path, include_subpath=True))
    assert client.get(request_path).status_code == 200
    assert only(upstream).target == expected


@pytest.mark.parametrize(
    "request_path",
    ["/sub/..", "/sub/../etc", "/sub/a/%2e%2e/%2E%2E/etc", "/sub/..%2fetc", "/sub/..%5cetc", "/sub/..;/etc", "/sub/./a"],
)
def test_dot_segments_are_rejected_and_never_sent(upstream, make_client, request_path):
    client = make_client(endpoint(upstream, "/sub", "/base", include_subpath=True))
    response = client.get(request_path)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "400"
    assert upstream.requests == []


def test_subpaths_are_404_without_include_subpath(upstream, make_client):
    client = make_client(endpoint(upstream, "/exact"))
    for path in ("/exact/", "/exact/a", "/exactly"):
        assert client.get(path).status_code == 404
    assert upstream.requests == []


def test_encoded_slash_is_not_a_route_separator(upstream, make_client):
    client = make_client(endpoint(upstream, "/sub", "/base", include_subpath=True))
    assert client.get("/sub%2Fa").status_code == 404
    assert upstream.requests == []


# -- URL: query ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("target_query", "fields", "caller_query", "expected"),
    [
        ("", {}, "a=1&b=2&a=3", "a=1&b=2&a=3"),
        ("", {}, "q=a+b&r=%2F&e=&k", "q=a+b&r=%2F&e=&k"),
        ("fixed=1", {}, "", "fixed=1"),
        ("fixed=1", {}, "c=1", "c=1"),
        ("fixed=1&over=target", {"merge_query_params": True}, "over=client&new=1", "fixed=1&over=client&new=1"),
        ("fixed=1&fixed=2", {"merge_query_params": True}, "c=1&c=2", "fixed=1&fixed=2&c=1&c=2"),
        ("", {"default_query_params": {"api-version": "2024", "over": "default"}}, "over=client", "over=client&api-version=2024"),
        ("", {"default_query_params": {"api-version": "2024", "over": "default"}}, "", "api-version=2024&over=default"),
        ("v=target", {"default_query_params": {"v": "default", "w": "a b"}}, "", "v=target&w=a%20b"),
    ],
)
def test_query_rules(upstream, make_client, target_query, fields, caller_query, expected):
    target = "/t?" + target_query if target_query else "/t"
    client = make_client(endpoint(upstream, "/q", target, **fields))
    assert client.get("/q?" + caller_query if caller_query else "/q").status_code == 200
    assert only(upstream).query == expected


# -- headers out -----------------------------------------------------------------------

def test_configured_headers_win_and_only_body_headers_pass_by_default(upstream, make_client):
    client = make_client(
        endpoint(upstream, headers={"Authorization": "bearer os.environ/SECRET", "X-Static": "v1", "X-Num": 5})
    )
    client.post(
        "/p",
        data=b"{}",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "br",
            "Content-Encoding": "identity",
            "Authorization": "Bearer caller-token",
            "X-Static": "caller",
            "X-Client": "c1",
            "Cookie": "sid=1",
            "User-Agent": "my-agent/1",
        },
    )
    seen = only(upstream)
    assert seen.header_all("authorization") == [f"bearer {SECRET}"]
    assert seen.header_all("x-static") == ["v1"]
    assert seen.header("x-num") == "5"
    assert seen.header("content-type") == "application/json"
    assert seen.header("accept") == "application/json"
    assert seen.header("accept-encoding") == "br"
    assert seen.header("content-encoding") == "identity"
    for absent in ("x-client", "cookie", "user-agent"):
        assert seen.header(absent) is None, absent


def test_no_client_library_headers_are_added(upstream, make_client):
    client = make_client(endpoint(upstream))
    client.get("/p", headers={"User-Agent": ""})
    seen = only(upstream)
    assert seen.names() == ["host"]
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"


def test_x_pass_headers_are_renamed_except_protected_names(upstream, make_client):
    client = make_client(endpoint(upstream, headers={"X-Static": "v1"}))
    client.get(
        "/p",
        headers={
            "x-pass-anthropic-beta": "beta1",
            "X-Pass-X-Static": "client",
            "x-pass-authorization": "evil",
            "x-pass-host": "evil.example",
            "x-pass-x-amz-date": "1",
            "x-pass-content-length": "99",
            "x-pass-transfer-encoding": "chunked",
            "x-pass-x-api-key": "evil",
        },
    )
    seen = only(upstream)
    assert seen.header("anthropic-beta") == "beta1"
    assert seen.header_all("x-static") == ["v1"]
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"
    for absent in ("authorization", "x-amz-date", "content-length", "transfer-encoding", "x-api-key"):
        assert seen.header(absent) is None, absent
    assert not [n for n in seen.names() if n.startswith("x-pass-")]


def test_forward_headers_forwards_end_to_end_headers_only(upstream, make_client):
    client = make_client(endpoint(upstream, forward_headers=True, headers={"X-Static": "v1"}))
    client.get(
        "/p",
        headers={
            "X-Client": "c1",
            "X-Static": "override",
            "User-Agent": "my-agent/1",
            "Cookie": "sid=1",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "Proxy-Authorization": "Basic eA==",
            "TE": "trailers",
            "Upgrade": "websocket",
            "Proxy": "http://evil.example",
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "Forwarded": "for=1.2.3.4",
            "Host": "caller.example",
        },
        environ_base={"REMOTE_ADDR": "198.51.100.7"},
    )
    seen = only(upstream)
    assert seen.header("x-client") == "c1"
    assert seen.header_all("x-static") == ["v1"]
    assert seen.header("user-agent") == "my-agent/1"
    assert seen.header("cookie") == "sid=1"
    assert seen.header("x-forwarded-for") == "203.0.113.9, 198.51.100.7"
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"
    for absent in (
        "connection", "x-hop", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade",
        "proxy", "x-forwarded-host", "x-forwarded-proto", "forwarded",
    ):
        assert seen.header(absent) is None, absent


def test_forward_headers_sets_x_forwarded_for_from_the_peer(upstream, make_client):
    client = make_client(endpoint(upstream, forward_headers=True))
    client.get("/p", environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert only(upstream).header("x-forwarded-for") == "198.51.100.7"


@pytest.mark.parametrize(
    "key_headers",
    [
        {"Authorization": f"Bearer {MASTER_KEY}"},
        {"x-litellm-api-key": MASTER_KEY},
        {"x-litellm-api-key": f"Bearer {MASTER_KEY}"},
        {"x-my-key": MASTER_KEY},
    ],
    ids=["authorization", "x-litellm-api-key", "x-litellm-api-key-bearer", "custom-header"],
)
@pytest.mark.parametrize("auth", [True, False], ids=["auth", "open"])
def test_proxy_key_is_never_forwarded(upstream, make_client, key_headers, auth):
    client = make_client(
        endpoint(upstream, forward_headers=True, auth=auth, headers={"litellm_user_api_key": "x-my-key"})
    )
    assert client.get("/p", headers=key_headers).status_code == 200
    seen = only(upstream)
    raw = seen.raw_head.decode("latin-1")
    assert MASTER_KEY not in raw
    assert seen.header("x-litellm-api-key") is None
    assert seen.header("x-my-key") is None
    assert seen.header("litellm_user_api_key") is None


def test_langfuse_keys_become_basic_auth(upstream, make_client):
    client = make_client(
        endpoint(
            upstream,
            headers={"LANGFUSE_PUBLIC_KEY": "os.environ/LF_PUB", "LANGFUSE_SECRET_KEY": "os.environ/LF_SEC"},
        ),
        env={"LF_PUB": "pk-lf-1", "LF_SEC": "sk-lf-2"},
    )
    client.post("/p", data=b"{}", headers={"Authorization": "Basic YW55dGhpbmc6YW55dGhpbmc="})
    seen = only(upstream)
    assert seen.header_all("authorization") == ["Basic cGstbGYtMTpzay1sZi0y"]
    assert seen.header("langfuse_public_key") is None


# -- bodies ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/octet-stream", bytes(range(256)) * 4),
        ("application/json", b'{ "b":1e2, "a" : [1,2,3],"metadata":{"k":"v"},"tags":["t"],"id":"x" ,"a":2}'),
        ("text/plain", "héllo\r\n\x00 raw".encode()),
        ("application/x-www-form-urlencoded", b"a=1&b=2&a=3"),
        ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n'
         b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\x02\xff\r\n--XyZ--\r\n"),
        ("application/json", b"[1,2,3]"),
    ],
    ids=["binary", "non-canonical-json", "text", "form", "multipart", "json-array"],
)
def test_bodies_are_forwarded_byte_exact(upstream, make_client, content_type, body):
    client = make_client(endpoint(upstream))
    client.post("/p", data=body, headers={"Content-Type": content_type})
    seen = only(upstream)
    assert seen.body == body
    assert seen.header("content-type") == content_type
    assert seen.header("content-length") == str(len(body))
    assert seen.header("transfer-encoding") is None


def test_empty_post_stays_empty(upstream, make_client):
    client = make_client(endpoint(upstream))
    client.post("/p")
    seen = only(upstream)
    assert seen.body == b""
    assert seen.header("content-type") is None
    assert seen.header("content-length") in (None, "0")


def test_five_megabyte_body_both_ways(upstream, make_client):
    body = pattern_bytes(5 * 1024 * 1024)
    upstream.route("/t", fixed(200, [("Content-Type", "application/octet-stream")], body))
    client = make_client(endpoint(upstream))
    response = client.put("/p", data=body, headers={"Content-Type": "application/octet-stream"})
    assert response.data == body
    assert only(upstream).sha256 == hashlib.sha256(body).hexdigest()


# -- responses -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (201, [("Content-Type", "application/json"), ("Location", "/things/1")], b'{"id":1}'),
        (204, [("X-Thing", "1")], b""),
        (207, [("Content-Type", "application/json")], b'{"successes":[],"errors":[]}'),
        (301, [("Location", "http://elsewhere.example/x")], b"moved"),
        (302, [("Location", "/other")], b""),
        (404, [("Content-Type", "application/json")], b'{"detail":"Not Found"}'),
        (429, [("Content-Type", "application/json"), ("Retry-After", "7")], b'{"error":"slow down"}'),
        (500, [("Content-Type", "text/html")], b"<h1>boom</h1>"),
        (502, [("Content-Type", "text/html")], b"<h1>bad gateway</h1>"),
    ],
)
def test_every_status_relayed_unchanged(upstream, make_client, status, headers, body):
    upstream.route("/t", fixed(status, headers, body))
    client = make_client(endpoint(upstream))
    response = client.post("/p", data=b"x")
    assert response.status_code == status
    assert response.data == body
    for name, value in headers:
        assert response.headers.get_all(name) == [value]
    assert response.headers["x-litellm-call-id"]
    assert len(upstream.requests) == 1  # redirects are not followed


def test_repeated_response_headers_stay_separate_and_nothing_is_invented(upstream, make_client):
    upstream.route(
        "/t",
        fixed(
            200,
            [("Set-Cookie", "a=1; Path=/"), ("Link", "<a>; rel=next"), ("Set-Cookie", "b=2; Path=/"), ("Link", "<b>; rel=prev")],
            b"hello",
        ),
    )
    client = make_client(endpoint(upstream))
    response = client.get("/p")
    assert response.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.headers.get_all("Link") == ["<a>; rel=next", "<b>; rel=prev"]
    assert "Content-Type" not in response.headers
    assert response.headers["Content-Length"] == "5"


def test_gzip_passes_undecoded(upstream, make_client):
    compressed = gzip.compress(b'{"hello":"world"}' * 100)
    upstream.route(
        "/t", fixed(200, [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], compressed)
    )
    client = make_client(endpoint(upstream))
    response = client.get("/p", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Length"] == str(len(compressed))
    assert response.data == compressed
    assert only(upstream).header("accept-encoding") == "gzip"


def test_upstream_cookies_are_not_replayed(upstream, make_client):
    upstream.route("/t", fixed(200, [("Set-Cookie", "session=abc; Path=/")], b"ok"))
    client = make_client(endpoint(upstream))
    client.get("/p")
    client.get("/p")
    _first, second = upstream.wait_for_requests(2)
    assert second.header("cookie") is None


def test_sse_gets_x_accel_buffering(upstream, make_client):
    upstream.route("/t", fixed(200, [("Content-Type", "text/event-stream")], b"data: 1\n\n"))
    client = make_client(endpoint(upstream))
    response = client.get("/p")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data == b"data: 1\n\n"


@pytest.mark.parametrize(
    ("method", "status", "body"),
    [("GET", 200, b"hello"), ("HEAD", 200, b""), ("GET", 204, b""), ("GET", 304, b"")],
)
def test_connection_is_reused_after_a_complete_body(upstream, make_client, method, status, body):
    upstream.route("/t", fixed(status, [("Content-Length", "5")] if method == "HEAD" else [], body))
    client = make_client(endpoint(upstream))
    for _ in range(3):
        assert client.open("/p", method=method).status_code == status
    assert {r.conn_id for r in upstream.wait_for_requests(3)} == {1}


# -- errors the proxy makes ------------------------------------------------------------

def assert_error(response, status):
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    body = response.json
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == str(status)
    assert body["error"]["param"] is None
    text = response.get_data(as_text=True)
    assert SECRET not in text and MASTER_KEY not in text and "Traceback" not in text


def test_refused_upstream_is_502(make_client):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client({"path": "/p", "target": f"http://127.0.0.1:{port}/t", "headers": {"Authorization": "os.environ/SECRET"}})
    assert_error(client.post("/p", data=b"x"), 502)


def test_upstream_closing_without_response_is_502(upstream, make_client):
    upstream.route("/t", close_without_response())
    client = make_client(endpoint(upstream))
    assert_error(client.post("/p", data=b"x"), 502)
    assert len(upstream.requests) == 1  # a POST is never retried


def test_stalled_upstream_is_504_after_the_endpoint_timeout(upstream, make_client):
    upstream.route("/t", stall(5))
    client = make_client(endpoint(upstream, timeout=1))
    assert_error(client.get("/p"), 504)


def test_failure_mid_body_aborts_instead_of_ending_cleanly(upstream, make_client):
    upstream.route("/t", die_mid_body(1000, b"x" * 100))
    client = make_client(endpoint(upstream))
    response = client.get("/p")
    assert response.status_code == 200
    with pytest.raises(ConnectionResetError):
        response.get_data()


def test_unknown_path_is_404_and_never_reaches_upstream(upstream, make_client):
    client = make_client(endpoint(upstream))
    assert_error(client.get("/nope"), 404)
    assert upstream.requests == []


def test_method_not_allowed_is_405_with_allow(upstream, make_client):
    client = make_client(
        endpoint(upstream, "/dup", "/get", methods=["get"]),
        endpoint(upstream, "/dup", "/post", methods=["POST"]),
    )
    response = client.put("/dup")
    assert_error(response, 405)
    assert response.headers["Allow"] == "GET, POST"
    for method in ("HEAD", "OPTIONS", "DELETE"):
        assert client.open("/dup", method=method).status_code == 405
    assert upstream.requests == []
    client.get("/dup")
    client.post("/dup")
    assert [(r.method, r.path) for r in upstream.wait_for_requests(2)] == [("GET", "/get"), ("POST", "/post")]


def test_most_specific_route_wins(upstream, make_client):
    client = make_client(
        endpoint(upstream, "/a", "/short", include_subpath=True),
        endpoint(upstream, "/a/b", "/long", include_subpath=True),
        endpoint(upstream, "/a/b/exact", "/exact"),
    )
    for path in ("/a/x", "/a/b", "/a/b/c/d", "/a/b/exact", "/a/b/exact/more"):
        assert client.get(path).status_code == 200, path
    targets = [r.target for r in upstream.wait_for_requests(5)]
    assert targets == ["/short/x", "/long", "/long/c/d", "/exact", "/long/exact/more"]


def test_options_and_head_are_forwarded_when_allowed(upstream, make_client):
    client = make_client(endpoint(upstream))
    assert client.options("/p", headers={"Access-Control-Request-Method": "POST"}).status_code == 200
    response = client.head("/p")
    assert response.status_code == 200 and response.data == b""
    assert [r.method for r in upstream.wait_for_requests(2)] == ["OPTIONS", "HEAD"]


# -- auth ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": MASTER_KEY}, 401),
        ({"Authorization": f"Bearer {MASTER_KEY}"}, 200),
        ({"Authorization": f"bearer {MASTER_KEY}"}, 200),
        ({"x-litellm-api-key": MASTER_KEY}, 200),
        ({"x-litellm-api-key": f"Bearer {MASTER_KEY}", "Authorization": "Bearer upstream-token"}, 200),
        ({"x-my-key": MASTER_KEY}, 200),
        ({"x-my-key": "nope"}, 401),
    ],
)
@pytest.mark.parametrize("path", ["/auth", "/auth/sub/path"])
def test_auth_on_exact_and_subpath_routes(upstream, make_client, headers, status, path):
    client = make_client(
        endpoint(upstream, "/auth", include_subpath=True, auth=True, headers={"litellm_user_api_key": "x-my-key"})
    )
    response = client.post(path, data=b"{}", headers=headers)
    if status == 401:
        assert_error(response, 401)
        assert response.json["error"]["type"] == "auth_error"
        assert upstream.requests == []
    else:
        assert response.status_code == 200
        assert len(upstream.wait_for_requests(1)) == 1


def test_health_endpoints(make_client):
    client = make_client()
    for path in ("/health/liveliness", "/health/liveness"):
        response = client.get(path)
        assert response.status_code == 200 and response.json == "I'm alive!"
    response = client.get("/health/readiness")
    assert response.status_code == 200 and response.json["status"] == "healthy"
    assert json.loads(response.data)
