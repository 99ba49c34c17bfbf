"""Tests of the test upstream server itself (tests/upstream.py).

Clients are raw sockets or http.client, so nothing between the test and the
server normalises bytes.  Every socket has a timeout, so no test can hang.
"""

import hashlib
import http.client
import json
import socket
import time

import pytest

from tests.upstream import Upstream
from tests.upstream import big_download
from tests.upstream import close_without_response
from tests.upstream import die_mid_body
from tests.upstream import fixed
from tests.upstream import pattern_bytes
from tests.upstream import pattern_sha256
from tests.upstream import sse
from tests.upstream import stall

TIMEOUT = 5.0


@pytest.fixture
def up():
    with Upstream() as server:
        yield server


# -- client helpers -----------------------------------------------------------


def connect(up, timeout=TIMEOUT):
    return socket.create_connection(("127.0.0.1", up.port), timeout=timeout)


def read_head(f) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline(65537)
        if not line:
            raise EOFError(f"EOF in response head after {head!r}")
        head += line
    return head


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


def read_response(f) -> tuple[bytes, bytes]:
    """Read one Content-Length response: (raw head, body)."""
    head = read_head(f)
    return head, f.read(content_length(head))


def read_chunk(f) -> bytes:
    size = int(f.readline(100).split(b";")[0], 16)
    data = f.read(size)
    assert f.read(2) == b"\r\n"
    return data


def http_conn(up, timeout=TIMEOUT):
    return http.client.HTTPConnection("127.0.0.1", up.port, timeout=timeout)


# -- recording ------------------------------------------------------------------


def test_headers_recorded_in_order_with_case_and_duplicates(up):
    head = (
        b"GET /h HTTP/1.1\r\nHost: example\r\nX-Dup: 1\r\nx-dup:  2 \r\n"
        b"X-MiXeD-Case:\tv\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"
    )
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(head)
        status_head, _ = read_response(f)
    assert status_head.startswith(b"HTTP/1.1 200 OK\r\n")
    (req,) = up.wait_for_requests(1)
    assert req.headers == [
        ("Host", "example"), ("X-Dup", "1"), ("x-dup", "2"),
        ("X-MiXeD-Case", "v"), ("Cookie", "a=1"), ("Cookie", "b=2"),
    ]  # fmt: skip
    assert req.names() == ["host", "x-dup", "x-dup", "x-mixed-case", "cookie", "cookie"]
    assert req.header("X-DUP") == "1"
    assert req.header_all("x-dup") == ["1", "2"]
    assert req.header("missing") is None
    assert req.raw_head == head
    assert (req.method, req.version, req.body, req.body_len, req.chunked) == ("GET", "HTTP/1.1", b"", 0, False)
    assert req.sha256 == hashlib.sha256(b"").hexdigest()
    assert up.errors == []


def test_raw_target_kept_byte_for_byte(up):
    target = "/a%2Fb/..%2f?x=1&x=2&y"
    conn = http_conn(up)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        echoed = json.loads(resp.read())
    finally:
        conn.close()
    (req,) = up.wait_for_requests(1)
    assert req.target == target
    assert (req.path, req.query) == ("/a%2Fb/..%2f", "x=1&x=2&y")
    assert req.raw_head.startswith(b"GET /a%2Fb/..%2f?x=1&x=2&y HTTP/1.1\r\n")
    assert echoed == {"method": "GET", "target": target, "body_len": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    assert resp.getheader("Content-Type") == "application/json"


def test_default_response_is_compact_json_and_nothing_else(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /x?q HTTP/1.1\r\nHost: h\r\n\r\n")
        head, body = read_response(f)
    expected = b'{"method":"GET","target":"/x?q","body_len":0,"sha256":"%s"}' % hashlib.sha256(b"").hexdigest().encode()
    assert body == expected
    assert head == b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(expected)


def test_content_length_body(up):
    data = pattern_bytes(100_000)
    conn = http_conn(up)
    try:
        conn.request("POST", "/upload", body=data, headers={"Content-Type": "application/octet-stream"})
        echoed = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    (req,) = up.wait_for_requests(1)
    assert (req.body, req.body_len, req.chunked) == (data, len(data), False)
    assert req.sha256 == hashlib.sha256(data).hexdigest() == echoed["sha256"]
    assert echoed["body_len"] == len(data)


def test_chunked_body_with_extensions_and_trailers(up):
    request = (
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n"
        b"1\r\n \r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(request)
        _, body = read_response(f)
    (req,) = up.wait_for_requests(1)
    assert req.chunked is True
    assert req.body == b"hello 0123456789"
    assert req.body_len == 16
    assert req.sha256 == hashlib.sha256(b"hello 0123456789").hexdigest()
    assert req.trailers == [("X-Trailer", "yes")]
    assert json.loads(body)["body_len"] == 16


def test_large_body_is_hashed_not_kept(up):
    data = pattern_bytes(3 * 1024 * 1024 + 7)
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(data))
        sock.sendall(data)
        read_response(f)
    (req,) = up.wait_for_requests(1)
    assert req.body == b""
    assert req.body_len == len(data)
    assert req.sha256 == hashlib.sha256(data).hexdigest()


def test_expect_100_continue_is_answered_before_the_body(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert read_head(f) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        head, body = read_response(f)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["body_len"] == 3


def test_keep_alive_two_requests_share_a_connection(up):
    conn = http_conn(up)
    try:
        for target in ("/one", "/two"):
            conn.request("GET", target)
            conn.getresponse().read()
    finally:
        conn.close()
    first, second = up.wait_for_requests(2)
    assert first.conn_id == second.conn_id == 1
    assert up.connections_opened == 1
    assert up.wait_connections_closed(0, timeout=TIMEOUT)
    assert up.connections_closed == 1


def test_pipelined_requests_in_one_segment(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /p1 HTTP/1.1\r\nHost: h\r\n\r\nGET /p2 HTTP/1.1\r\nHost: h\r\n\r\n")
        bodies = [read_response(f)[1] for _ in range(2)]
    assert [json.loads(b)["target"] for b in bodies] == ["/p1", "/p2"]


def test_connection_close_request_closes_after_response(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        read_response(f)
        assert f.read() == b""  # the server closed its side
    assert up.wait_connections_closed(0, timeout=TIMEOUT)


def test_http10_without_keep_alive_closes(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        read_response(f)
        assert f.read() == b""


# -- routing and scripted responses -----------------------------------------


def test_fixed_writes_exactly_the_given_head(up):
    up.route("/f", fixed(201, [("X-A", "1"), ("x-a", "2"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], b"hello"))
    up.route("/nc", fixed(204, [("X-Empty", "")]))
    up.route("/reason", fixed(599, [("Content-Length", "0")], reason="Odd Thing"))
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /f HTTP/1.1\r\nHost: h\r\n\r\n")
        head, body = read_response(f)
        assert head == (
            b"HTTP/1.1 201 Created\r\nX-A: 1\r\nx-a: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        assert body == b"hello"
        sock.sendall(b"GET /nc HTTP/1.1\r\nHost: h\r\n\r\n")
        assert read_head(f) == b"HTTP/1.1 204 No Content\r\nX-Empty: \r\n\r\n"
        sock.sendall(b"GET /reason HTTP/1.1\r\nHost: h\r\n\r\n")
        assert read_head(f) == b"HTTP/1.1 599 Odd Thing\r\nContent-Length: 0\r\n\r\n"


def test_exact_route_beats_longest_prefix(up):
    up.route_prefix("/api/", fixed(200, body=b"short"))
    up.route_prefix("/api/v1/", fixed(200, body=b"long"))
    up.route("/api/v1/exact", fixed(200, body=b"exact"))
    conn = http_conn(up)
    try:
        got = {}
        for target in ("/api/x", "/api/v1/x?q=1", "/api/v1/exact?z", "/other"):
            conn.request("GET", target)
            got[target] = conn.getresponse().read()
    finally:
        conn.close()
    assert got["/api/x"] == b"short"
    assert got["/api/v1/x?q=1"] == b"long"
    assert got["/api/v1/exact?z"] == b"exact"
    assert json.loads(got["/other"])["target"] == "/other"


def test_sse_sends_one_chunk_per_event_with_the_interval(up):
    events = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
    handler = up.route("/events", sse(events, interval=0.3))
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: h\r\n\r\n")
        head = read_head(f)
        received, read_at = [], []
        for _ in events:
            received.append(read_chunk(f))
            read_at.append(time.monotonic())
        assert read_chunk(f) == b""  # "0\r\n\r\n": last chunk, no trailers
    assert head == b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert received == events
    assert len(handler.sent_at) == 3
    gaps = [b - a for a, b in zip(handler.sent_at, handler.sent_at[1:], strict=False)]
    assert all(0.28 <= gap < 1.0 for gap in gaps), gaps
    # Each event arrives as soon as it is written, not batched at the end.  The
    # reader may even win the race with the handler's sent_at.append().
    lags = [read - sent for sent, read in zip(handler.sent_at, read_at, strict=False)]
    assert all(abs(lag) < 0.1 for lag in lags), lags


def test_stall_records_the_request_and_notices_the_peer_leaving(up):
    up.route("/slow", stall(30))
    sock = connect(up, timeout=0.5)
    with sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        (req,) = up.wait_for_requests(1)
        assert req.body == b"hi"
        with pytest.raises(TimeoutError):
            sock.recv(1)
    assert up.wait_connections_closed(0, timeout=2.0)


def test_stall_answers_late_when_it_wakes(up):
    up.route("/late", stall(0.2))
    conn = http_conn(up)
    try:
        start = time.monotonic()
        conn.request("GET", "/late")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"late")
        assert time.monotonic() - start >= 0.2
    finally:
        conn.close()


def test_close_without_response(up):
    up.route("/drop", close_without_response())
    conn = http_conn(up)
    try:
        conn.request("GET", "/drop")
        with pytest.raises(http.client.RemoteDisconnected):
            conn.getresponse()
    finally:
        conn.close()
    assert len(up.wait_for_requests(1)) == 1
    assert up.wait_connections_closed(0, timeout=TIMEOUT)


def test_die_mid_body(up):
    up.route("/partial", die_mid_body(100, b"only-this"))
    conn = http_conn(up)
    try:
        conn.request("GET", "/partial")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == "100"
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial == b"only-this"
    finally:
        conn.close()


def test_big_download_streams_50_mib(up):
    n_bytes = 50 * 1024 * 1024
    up.route("/big", big_download(n_bytes))
    digest, received = hashlib.sha256(), 0
    start = time.monotonic()
    conn = http_conn(up)
    try:
        conn.request("GET", "/big")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == str(n_bytes)
        while piece := resp.read(1 << 20):
            digest.update(piece)
            received += len(piece)
    finally:
        conn.close()
    assert received == n_bytes
    assert digest.hexdigest() == pattern_sha256(n_bytes)
    assert time.monotonic() - start < 10


def test_pattern_helpers_agree():
    for n in (0, 1, 250, 251, 252, 70_000, 200_003):
        assert hashlib.sha256(pattern_bytes(n)).hexdigest() == pattern_sha256(n)
    assert pattern_bytes(502)[251:] == pattern_bytes(251)  # period 251
    assert len(set(pattern_bytes(251))) == 251


# -- robustness -------------------------------------------------------------------


def test_head_over_64_kib_gets_431(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert read_head(f).startswith(b"HTTP/1.1 431 ")
        assert f.read() == b""
    assert up.requests == []
    assert any("431" in error for error in up.errors)


def test_bad_request_line_gets_400(up):
    with connect(up) as sock, sock.makefile("rb") as f:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert read_head(f).startswith(b"HTTP/1.1 400 ")


def test_handler_exception_is_recorded_not_printed(up, capfd):
    def broken(req, w):
        raise RuntimeError("handler bug")

    up.route("/boom", broken)
    with connect(up) as sock:
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
        assert sock.recv(100) == b""
    assert up.wait_connections_closed(0, timeout=TIMEOUT)
    assert len(up.errors) == 1 and "RuntimeError: handler bug" in up.errors[0]
    assert capfd.readouterr().err == ""


def test_wait_for_requests_raises_when_nothing_comes(up):
    start = time.monotonic()
    with pytest.raises(AssertionError):
        up.wait_for_requests(1, timeout=0.2)
    assert time.monotonic() - start < 1


def test_stop_is_prompt_with_a_stalled_handler():
    server = Upstream().start()
    server.route("/slow", stall(60))
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        server.wait_for_requests(1)
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 2
        assert sock.recv(100) == b""  # the client sees the connection end
    assert server.open_connections() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
