"""Adversarial faults and resource abuse, through the production stack (real gunicorn).

The fault rows of the README's "Security and hostile input" table (release of upstream
connections; 502, 504 and aborted connections; hostile input): upstream stalls, early
closes and malformed responses; callers that vanish, trickle or stop reading; very large,
over-limit (413) and compressed bodies; a burst of concurrent requests that must each get
their own answer.

Everything runs against module-scoped gunicorn processes and recording upstreams on
loopback. Every socket has a timeout, every loop a bound in count and time. Worker memory
figures are printed (run with ``pytest -s`` to see them).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest

from tests.conftest import subprocess_env
from tests.gunicorn_proc import reset_peak
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import status_kib
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream
from tests.upstream import big_download
from tests.upstream import close_without_response
from tests.upstream import pattern_bytes
from tests.upstream import pattern_sha256
from tests.upstream import sse
from tests.upstream import stall

MiB = 1024 * 1024
BIG = 200 * MiB
RSS_BOUND_KIB = 64 * 1024  # generous: the goal is < 8 MiB, a buffering bug is >= 200 MiB
FAULT_TIMEOUT = 1  # the /f endpoint's read timeout, seconds
# PROXY_MAX_BODY_BYTES of the `proxy_limited` stack. Above body.CHUNK_SIZE (64 KiB), so a body
# at the limit is streamed in several reads, and the chunked check adds up several pieces.
MAX_BODY = 256 * 1024


# --------------------------------------------------------------------------
# Upstream handlers written for this file
# --------------------------------------------------------------------------


def echo_ids():
    """Echo the request id carried in the path's last segment, the query, a header and the body."""

    def handler(req, w):
        try:
            body_id = json.loads(req.body)["id"] if req.body else None
        except (ValueError, KeyError, TypeError):
            body_id = None
        payload = {
            "path": req.path.rsplit("/", 1)[-1],
            "query": parse_qs(req.query).get("id", [None])[0],
            "header": req.header("x-req-id"),
            "body": body_id,
        }
        data = json.dumps(payload, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json"), ("X-Echo-Id", req.header("x-req-id") or "-")]
        w.respond(200, headers, data)

    return handler


def raw_reply(data: bytes, close: bool = False):
    """Send these exact bytes as the whole answer; keep the connection open unless `close`.

    Keeping it open is the point: a proxy that put this connection back in its pool would
    read the leftover bytes as the answer to somebody else's request.
    """

    def handler(req, w):
        try:
            w.send_raw(data)
        except OSError:
            return  # the proxy gave up reading (huge heads): expected
        if close:
            w.close()

    return handler


def body_then(framing: str, fault: str):
    """A valid head and 1000 body bytes, then a stall (30 s) or a close."""

    def handler(req, w):
        if framing == "cl":
            w.respond(200, [("Content-Type", "application/octet-stream"), ("Content-Length", "100000")], b"x" * 1000)
        else:
            w.start_chunked(200, [("Content-Type", "application/octet-stream")])
            w.chunk(b"x" * 1000)
        if fault == "stall":
            w.sleep(30)
        w.close()

    return handler


# A complete response that a poisoned pool would hand to the next caller.
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nsmuggled"

# id -> (bytes the upstream sends, close after?, expected outcome)
#   "502": a complete JSON 502 from the proxy;
#   "abort": the head was valid, only the body is bad: a 502, or a connection that ends
#            without a complete response (never a clean, complete response).
BAD_FRAMING = {
    "cl_and_te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        False,
        "502",
    ),
    "te_obfuscated_and_cl": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED,
        False,
        "502",
    ),
    "bad_chunk_size_zz": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        False,
        "abort",
    ),
    "duplicate_cl_different": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 12\r\n\r\nok" + SMUGGLED,
        False,
        "502",
    ),
    "cl_list_different": (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 12\r\n\r\nok" + SMUGGLED, False, "502"),
    "cl_not_a_number": (
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
        True,
        "502",
    ),
    "cl_negative": (
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
        True,
        "502",
    ),
    "space_before_colon": (
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok" + SMUGGLED,
        True,
        "502",
    ),
    "nul_in_header": (
        b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED,
        False,
        "502",
    ),
    "two_hundred_headers": (
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"Content-Length: 2\r\n\r\nok" + SMUGGLED,
        False,
        "502",
    ),
    "header_line_100kB": (
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED,
        False,
        "502",
    ),
    "garbage": (b"garbage\r\n\r\n" + SMUGGLED, False, "502"),
    "http09": (b"<html>hello from 1991</html>\n", True, "502"),
    "bad_status_code": (b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED, False, "502"),
}


# --------------------------------------------------------------------------
# Fixtures: two upstreams and three gunicorn instances for the whole module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    return subprocess_env()


@pytest.fixture(scope="module")
def up():
    """The main upstream: faults, echo, large bodies."""
    with Upstream() as server:
        for prefix in ("/f/echo/", "/r/echo/"):
            server.route_prefix(prefix, echo_ids())
        server.route_prefix("/f/stall/", stall(30))
        for framing in ("cl", "chunked"):
            for fault in ("stall", "close"):
                server.route_prefix(f"/f/mid/{fault}/{framing}/", body_then(framing, fault))
        server.route_prefix("/r/none/", close_without_response())
        for name, (data, close, _) in BAD_FRAMING.items():
            server.route_prefix(f"/r/bad/{name}/", raw_reply(data, close))
        server.route("/r/down", big_download(BIG))
        yield server


@pytest.fixture(scope="module")
def res_up():
    """A second upstream whose connections are only the ones a test opens (counted exactly)."""
    events = [b"data: {\"n\":%d}\n\n" % i for i in range(1200)]
    with Upstream() as server:
        server.route("/s/sse", sse(events, interval=0.05))
        server.route("/s/slowdl", big_download(64 * MiB))
        yield server


def endpoints(up_url: str, res_url: str | None = None) -> dict:
    entries = [
        {"path": "/f", "target": up_url + "/f", "include_subpath": True, "timeout": FAULT_TIMEOUT},
        {"path": "/r", "target": up_url + "/r", "include_subpath": True, "timeout": 30},
    ]
    if res_url:
        entries.append({"path": "/s", "target": res_url + "/s", "include_subpath": True, "timeout": 30})
    return {"general_settings": {"pass_through_endpoints": entries}}


@pytest.fixture(scope="module")
def proxy(up, res_up, env, tmp_path_factory):
    """The production stack, one worker, 8 threads, 16 connection slots."""
    path = write_config(tmp_path_factory.mktemp("proxy8"), endpoints(up.url, res_up.url))
    with run_gunicorn(path, {**env, "PROXY_WORKER_CONNECTIONS": "16"}, workers=1, threads=8) as server:
        (server.worker,) = server.worker_pids()
        check_echo(server, "/r", "warmup")  # builds the worker's Session and pool
        yield server


@pytest.fixture(scope="module")
def proxy2(up, env, tmp_path_factory):
    """The same stack with only two threads: a leaked thread would be visible at once."""
    path = write_config(tmp_path_factory.mktemp("proxy2"), endpoints(up.url))
    with run_gunicorn(path, env, workers=1, threads=2) as server:
        yield server


@pytest.fixture(scope="module")
def proxy_limited(up, env, tmp_path_factory):
    """The same stack with PROXY_MAX_BODY_BYTES set (proxy_app/body.py reads it at import, in the worker)."""
    path = write_config(tmp_path_factory.mktemp("proxy_limited"), endpoints(up.url))
    with run_gunicorn(path, {**env, "PROXY_MAX_BODY_BYTES": str(MAX_BODY)}, workers=1, threads=4) as server:
        yield server


@pytest.fixture(scope="module")
def proxy_defaults(up, env, tmp_path_factory):
    """Production capacity defaults (WEB_CONCURRENCY 2, PROXY_THREADS 32): room for 50 callers."""
    path = write_config(tmp_path_factory.mktemp("proxy_defaults"), endpoints(up.url))
    with run_gunicorn(path, env, workers=2, threads=32) as server:
        yield server


# --------------------------------------------------------------------------
# Client helpers
# --------------------------------------------------------------------------


def new_id() -> str:
    return uuid.uuid4().hex


def send_echo(conn: http.client.HTTPConnection, prefix: str, rid: str) -> http.client.HTTPResponse:
    body = json.dumps({"id": rid}).encode()
    headers = {"Content-Type": "application/json", "x-pass-x-req-id": rid}
    conn.request("POST", f"{prefix}/echo/{rid}?id={rid}", body=body, headers=headers)
    return conn.getresponse()


def echo_problem(response: http.client.HTTPResponse, data: bytes, rid: str) -> str | None:
    """None when the response is the echo of request `rid`, else what is wrong."""
    if response.status != 200:
        return f"status {response.status}: {data[:200]!r}"
    try:
        echoed = json.loads(data)
    except ValueError:
        return f"not JSON: {data[:200]!r}"
    expected = {"path": rid, "query": rid, "header": rid, "body": rid}
    if echoed != expected:
        return f"echo {echoed} != {expected}"
    if response.getheader("X-Echo-Id") != rid:
        return f"X-Echo-Id {response.getheader('X-Echo-Id')!r} != {rid!r}"
    return None


def check_echo(server, prefix: str = "/r", rid: str | None = None, timeout: float = 10.0) -> float:
    """One echo request on a fresh connection; assert it is our own answer; return seconds."""
    rid = rid or new_id()
    started = time.monotonic()
    conn = server.connection(timeout=timeout)
    try:
        response = send_echo(conn, prefix, rid)
        data = response.read()
    finally:
        conn.close()
    problem = echo_problem(response, data, rid)
    assert problem is None, problem
    return time.monotonic() - started


def pool_is_clean(server, prefix: str = "/r") -> None:
    """The next few requests to the same upstream each get their own, correct answer."""
    for _ in range(3):
        check_echo(server, prefix)


def exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[bytes, float, bool]:
    """Send raw bytes; read until EOF, reset or the deadline. (data, seconds, ended)."""
    started = time.monotonic()
    deadline = started + timeout
    data = b""
    ended = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sock.settimeout(0.5)
        while time.monotonic() < deadline and len(data) < 64 * MiB:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                ended = True
                break
            if not piece:
                ended = True
                break
            data += piece
    return data, time.monotonic() - started, ended


def parse_response(data: bytes) -> tuple[int | None, dict, bytes, bool]:
    """(status, headers lower-cased, decoded body, complete) of one raw HTTP/1.1 response."""
    if b"\r\n\r\n" not in data:
        return None, {}, b"", False
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = b""
        for _ in range(100_000):
            size_line, sep, after = rest.partition(b"\r\n")
            if not sep:
                return status, headers, body, False
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return status, headers, body, after.startswith(b"\r\n")
            if len(after) < size + 2:
                return status, headers, body + after[:size], False
            body += after[:size]
            rest = after[size + 2 :]
        return status, headers, body, False
    if "content-length" in headers:
        length = int(headers["content-length"])
        return status, headers, rest[:length], len(rest) >= length
    return status, headers, rest, False


def get_raw(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode()


def assert_json_error(data: bytes, status: int) -> None:
    got, headers, body, complete = parse_response(data)
    assert got == status, data[:300]
    assert complete, data[:300]
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert json.loads(body)["error"]["code"] == str(status), body


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------
# Upstream stalls and early closes
# --------------------------------------------------------------------------


def test_stall_before_headers_is_504_within_the_timeout(proxy, up):
    data, elapsed, _ = exchange(proxy.port, get_raw(f"/f/stall/{new_id()}"))
    assert_json_error(data, 504)
    assert elapsed < FAULT_TIMEOUT + 2, elapsed
    pool_is_clean(proxy, "/f")


def test_stalled_upstreams_free_their_worker_threads(proxy2, up):
    """threads=2: two 504s, then a normal request must still be answered promptly."""
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        results = list(pool.map(lambda _: exchange(proxy2.port, get_raw(f"/f/stall/{new_id()}")), range(2)))
        elapsed = time.monotonic() - started
    for data, _, _ in results:
        assert_json_error(data, 504)
    assert elapsed < FAULT_TIMEOUT + 2.5, elapsed
    for _ in range(3):
        assert check_echo(proxy2, "/f", timeout=5) < 2.0


@pytest.mark.parametrize("framing", ["cl", "chunked"])
@pytest.mark.parametrize("fault", ["stall", "close"])
def test_failure_mid_body_aborts_the_callers_connection(proxy, up, fault, framing):
    data, elapsed, ended = exchange(proxy.port, get_raw(f"/f/mid/{fault}/{framing}/{new_id()}"))
    status, headers, body, complete = parse_response(data)
    assert status == 200, data[:300]
    assert ended, "the proxy kept the caller's connection open"
    assert not complete, "a failed body was presented as complete"
    assert body == b"x" * 1000
    if framing == "cl":
        assert headers["content-length"] == "100000"
    else:
        assert "chunked" in headers.get("transfer-encoding", "")
    assert elapsed < FAULT_TIMEOUT + 3, elapsed
    pool_is_clean(proxy, "/f")


@pytest.mark.parametrize("framing", ["cl", "chunked"])
def test_mid_body_failure_is_an_error_for_http_client(proxy, up, framing):
    """The same truncation as seen by a stock client: an exception, never a short read."""
    conn = proxy.connection(timeout=10)
    try:
        conn.request("GET", f"/f/mid/close/{framing}/{new_id()}")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_close_without_response_is_502_and_never_retried(proxy, up, method):
    pool_is_clean(proxy)  # leaves a kept-alive pooled connection: the next request reuses it
    path = f"/r/none/{new_id()}"
    body = b'{"charge":"once"}'
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    data, elapsed, _ = exchange(proxy.port, request)
    assert_json_error(data, 502)
    assert elapsed < 5, elapsed
    time.sleep(0.5)  # a retry, if any, would arrive now
    seen = [r for r in up.requests if r.path == path]
    assert len(seen) == 1, [f"{r.method} {r.path} conn {r.conn_id}" for r in seen]
    pool_is_clean(proxy)


@pytest.mark.parametrize("case", list(BAD_FRAMING), ids=list(BAD_FRAMING))
def test_malformed_upstream_response_is_502(proxy, up, case):
    _, _, expected = BAD_FRAMING[case]
    data, elapsed, ended = exchange(proxy.port, get_raw(f"/r/bad/{case}/{new_id()}"))
    assert b"smuggled" not in data, data[-300:]
    if expected == "502":
        assert_json_error(data, 502)
    else:
        status, _, _, complete = parse_response(data)
        assert (status == 502 and complete) or (ended and not complete), data[:300]
    assert elapsed < 5, elapsed


@pytest.mark.parametrize("case", list(BAD_FRAMING), ids=list(BAD_FRAMING))
def test_malformed_upstream_response_never_poisons_the_pool(proxy, up, case):
    """Whatever the caller got, the next requests to that upstream get their own answers."""
    exchange(proxy.port, get_raw(f"/r/bad/{case}/{new_id()}"))
    pool_is_clean(proxy)


# --------------------------------------------------------------------------
# Callers that vanish
# --------------------------------------------------------------------------


def read_one_event_and_leave(port: int) -> None:
    """Open the SSE stream, read until the first event has arrived, close the socket."""
    deadline = time.monotonic() + 10
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /s/sse HTTP/1.1\r\nHost: proxy\r\n\r\n")
        data = b""
        while b"data:" not in data.partition(b"\r\n\r\n")[2]:
            assert time.monotonic() < deadline, data
            piece = sock.recv(65536)
            assert piece, data
            data += piece
        assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_caller_leaving_mid_stream_releases_the_upstream_connection(proxy, res_up):
    assert res_up.wait_connections_closed(0, timeout=10)
    opened = res_up.connections_opened
    read_one_event_and_leave(proxy.port)
    left = time.monotonic()
    assert res_up.wait_connections_closed(0, timeout=5), res_up.open_connections()
    released_after = time.monotonic() - left
    print(f"\n[disconnect] upstream connection released {released_after * 1000:.0f} ms after the caller left")
    assert res_up.connections_opened == opened + 1


def test_hundred_disconnects_leak_nothing(proxy, res_up):
    assert res_up.wait_connections_closed(0, timeout=10)
    read_one_event_and_leave(proxy.port)  # warm the code path before counting fds
    assert res_up.wait_connections_closed(0, timeout=5)
    opened, closed = res_up.connections_opened, res_up.connections_closed
    fds_before = fd_count(proxy.worker)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: read_one_event_and_leave(proxy.port), range(100)))
    assert res_up.wait_connections_closed(0, timeout=15), res_up.open_connections()
    opened_delta = res_up.connections_opened - opened
    closed_delta = res_up.connections_closed - closed
    time.sleep(0.5)  # let gunicorn close the last caller sockets
    fds_after = fd_count(proxy.worker)
    print(
        f"\n[disconnect x100] upstream connections opened {opened_delta}, closed {closed_delta}, "
        f"open now {res_up.open_connections()}; worker fds {fds_before} -> {fds_after}"
    )
    assert (opened_delta, closed_delta) == (100, 100)
    assert fds_after - fds_before <= 5
    check_echo(proxy)


# --------------------------------------------------------------------------
# Slow callers
# --------------------------------------------------------------------------


def slow_header(port: int, trickle: int = 15) -> None:
    """Send the request head one byte per 0.2 s (`trickle` bytes), then the rest; expect our echo."""
    rid = new_id()
    head = (
        f"GET /r/echo/{rid}?id={rid} HTTP/1.1\r\nHost: proxy\r\nx-pass-x-req-id: {rid}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for index in range(trickle):
            sock.sendall(head[index : index + 1])
            time.sleep(0.2)
        sock.sendall(head[trickle:])
        data = read_until_eof(sock)
    status, _, echoed, complete = parse_response(data)
    assert status == 200 and complete and json.loads(echoed)["header"] == rid, data[:300]


def slow_body(port: int) -> None:
    """Send the head at once, then the body one byte per 0.2 s for 3 s, then the rest."""
    rid = new_id()
    body = json.dumps({"id": rid}).encode()
    head = (
        f"POST /r/echo/{rid}?id={rid} HTTP/1.1\r\nHost: proxy\r\nx-pass-x-req-id: {rid}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for index in range(15):
            sock.sendall(body[index : index + 1])
            time.sleep(0.2)
        sock.sendall(body[15:])
        data = read_until_eof(sock)
    status, _, echoed, complete = parse_response(data)
    assert status == 200 and complete and json.loads(echoed)["body"] == rid, data[:300]


def slow_reader(port: int) -> None:
    """Start a 64 MiB download, stop reading for 3 s (tiny receive buffer), then vanish."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    with sock:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /s/slowdl HTTP/1.1\r\nHost: proxy\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(3.0)


def read_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline and len(data) < MiB:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def in_background(target, *args) -> tuple[threading.Thread, list]:
    errors = []

    def run():
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("slow_caller", [slow_header, slow_body, slow_reader], ids=["slow_header", "slow_body", "slow_reader"])
def test_slow_caller_does_not_stop_others(proxy, res_up, slow_caller):
    thread, errors = in_background(slow_caller, proxy.port)
    try:
        time.sleep(1.0)
        assert thread.is_alive()
        durations = [check_echo(proxy, timeout=5) for _ in range(3)]
        assert max(durations) < 2.0, durations
    finally:
        thread.join(15)
    assert not thread.is_alive()
    assert not errors, errors
    # the vanished reader's upstream connection is released too
    assert res_up.wait_connections_closed(0, timeout=10), res_up.open_connections()


def wait_until_serving(server, seconds: float = 20.0) -> None:
    """Bounded wait for the proxy to answer again (cleanup after a starvation test)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            check_echo(server, timeout=2)
            return
        except (OSError, AssertionError):
            time.sleep(0.2)


@pytest.mark.parametrize("idle", [8, 16], ids=["idle_eq_threads", "idle_eq_worker_connections"])
def test_idle_connections_do_not_stop_others(proxy, idle):
    """Callers that connect and then send nothing never stop other callers being served (README: idle connections)."""
    sockets = []
    try:
        for _ in range(idle):
            sockets.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        time.sleep(0.5)
        assert check_echo(proxy, timeout=3) < 2.0
    finally:
        for sock in sockets:
            sock.close()
        wait_until_serving(proxy)


def test_kept_alive_callers_that_go_quiet_do_not_stop_others(proxy):
    """A thread that answered waits for the next request on that connection only briefly
    (worker.KEEPALIVE_LINGER_MS, and only while few threads are busy): as many quiet
    kept-alive callers as threads leave every thread free for a new caller."""
    conns = []
    try:
        for _ in range(8):  # the fixture's thread count
            conn = proxy.connection(timeout=5)
            rid = new_id()
            response = send_echo(conn, "/r", rid)
            assert echo_problem(response, response.read(), rid) is None
            conns.append(conn)
        time.sleep(0.1)
        assert check_echo(proxy, timeout=3) < 1.0
        # and the quiet connections still serve their next request
        for conn in conns:
            rid = new_id()
            response = send_echo(conn, "/r", rid)
            assert echo_problem(response, response.read(), rid) is None
    finally:
        for conn in conns:
            conn.close()


# --------------------------------------------------------------------------
# Memory: large bodies, compressed bodies
# --------------------------------------------------------------------------


def upload_blocks(size: int):
    block = bytes(range(256)) * 256  # 64 KiB
    return (block for _ in range(size // len(block)))


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_200_mb_upload_keeps_worker_memory_flat(proxy, up, chunked):
    expected = hashlib.sha256()
    for block in upload_blocks(BIG):
        expected.update(block)
    path = f"/r/up/{new_id()}"
    before = reset_peak(proxy.worker)
    conn = proxy.connection(timeout=60)
    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(BIG)
    started = time.monotonic()
    try:
        conn.request("POST", path, body=upload_blocks(BIG), headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    seconds = time.monotonic() - started
    growth = status_kib(proxy.worker, "VmHWM") - before
    framing = "chunked" if chunked else "Content-Length"
    print(f"\n[rss] 200 MiB upload ({framing}): {seconds:.1f} s, worker peak RSS growth {growth / 1024:.2f} MiB")
    assert response.status == 200
    (seen,) = [r for r in up.requests if r.path == path]
    assert (seen.body_len, seen.sha256, seen.chunked) == (BIG, expected.hexdigest(), chunked)
    assert growth < RSS_BOUND_KIB


def test_200_mb_download_keeps_worker_memory_flat(proxy, up):
    before = reset_peak(proxy.worker)
    conn = proxy.connection(timeout=60)
    digest = hashlib.sha256()
    started = time.monotonic()
    try:
        conn.request("GET", "/r/down")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == str(BIG)
        for _ in range(BIG // MiB + 2):
            chunk = response.read(MiB)
            if not chunk:
                break
            digest.update(chunk)
    finally:
        conn.close()
    seconds = time.monotonic() - started
    growth = status_kib(proxy.worker, "VmHWM") - before
    print(f"\n[rss] 200 MiB download: {seconds:.1f} s, worker peak RSS growth {growth / 1024:.2f} MiB")
    assert digest.hexdigest() == pattern_sha256(BIG)
    assert growth < RSS_BOUND_KIB


def gzip_bomb() -> bytes:
    """1 GiB of zeros as gzip (~1 MB): 16 gzip members of 64 MiB each (RFC 1952 allows a series)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    member = b"".join(compressor.compress(zeros) for _ in range(64)) + compressor.flush()
    return member * 16


def test_gzip_bomb_passes_through_compressed(proxy, up):
    bomb = gzip_bomb()
    assert len(bomb) < 2 * MiB
    inflated = zlib.decompressobj(31)
    assert len(inflated.decompress(bomb[: len(bomb) // 16], 1024)) == 1024  # it is real gzip
    headers = [("Content-Type", "application/json"), ("Content-Encoding", "gzip"), ("Content-Length", str(len(bomb)))]
    up.route("/r/bomb", lambda req, w: w.respond(200, headers, bomb))
    before = reset_peak(proxy.worker)
    for accept in ("gzip", "identity"):  # the upstream sends gzip either way; the proxy never inflates
        conn = proxy.connection(timeout=30)
        try:
            conn.request("GET", "/r/bomb", headers={"Accept-Encoding": accept})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        assert response.status == 200
        assert response.getheader("Content-Encoding") == "gzip"
        assert response.getheader("Content-Length") == str(len(bomb))
        assert hashlib.sha256(data).digest() == hashlib.sha256(bomb).digest()
    growth = status_kib(proxy.worker, "VmHWM") - before
    print(f"\n[rss] gzip bomb ({len(bomb) / MiB:.2f} MiB compressed, 1 GiB inflated) x2: worker peak RSS growth {growth / 1024:.2f} MiB")
    assert growth < RSS_BOUND_KIB


# --------------------------------------------------------------------------
# The request body size limit: 413 end to end
# --------------------------------------------------------------------------


def upload_request(path: str, payload: bytes, chunked: bool, close: bool = True) -> bytes:
    """A POST carrying ``payload`` with a Content-Length, or chunked in 64 KiB chunks."""
    head = f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/octet-stream\r\n"
    if close:
        head += "Connection: close\r\n"
    if not chunked:
        return (head + f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    step = 64 * 1024
    chunks = [payload[i : i + step] for i in range(0, len(payload), step)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body


def wait_for_disconnects(server: Upstream, count: int, timeout: float = 5.0) -> list[str]:
    """The upstream's record of peers that left mid-request, once it holds ``count`` (bounded)."""
    deadline = time.monotonic() + timeout
    while len(server.disconnects) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(server.disconnects)


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_body_over_the_size_limit_is_413_and_never_completed_upstream(proxy_limited, up, chunked):
    path = f"/r/limit/{new_id()}"
    opened, disconnects, errors = up.connections_opened, len(up.disconnects), len(up.errors)
    # A keep-alive request: the proxy itself must close the connection after the 413, since
    # what follows the unread body on it is not a request (README: "Security and hostile input").
    request = upload_request(path, pattern_bytes(MAX_BODY + 1), chunked, close=False)
    data, elapsed, ended = exchange(proxy_limited.port, request)
    assert_json_error(data, 413)
    assert ended, "the connection stayed open after a body that was not read to its end"
    assert elapsed < 5, elapsed
    if chunked:
        # The body streams upstream as it arrives, so the upstream saw the request begin; the
        # proxy then dropped that connection before the last chunk: the upstream records a
        # peer that left mid-request, and no request.
        assert len(wait_for_disconnects(up, disconnects + 1)) == disconnects + 1, up.disconnects
    else:
        # The Content-Length alone is over the limit: refused before anything is sent.
        time.sleep(0.5)
        assert up.connections_opened == opened
        assert len(up.disconnects) == disconnects, up.disconnects
    assert len(up.errors) == errors, up.errors
    assert [r for r in up.requests if r.path == path] == []
    check_echo(proxy_limited)  # the worker serves the next caller


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_body_at_the_size_limit_passes_byte_for_byte(proxy_limited, up, chunked):
    path = f"/r/limit/{new_id()}"
    payload = pattern_bytes(MAX_BODY)
    data, elapsed, _ = exchange(proxy_limited.port, upload_request(path, payload, chunked))
    status, _, body, complete = parse_response(data)
    assert (status, complete) == (200, True), data[:300]
    assert elapsed < 5, elapsed
    (seen,) = [r for r in up.requests if r.path == path]
    assert (seen.body_len, seen.chunked) == (MAX_BODY, chunked)
    assert seen.body == payload
    assert json.loads(body)["body_len"] == MAX_BODY


# --------------------------------------------------------------------------
# A burst: every answer is the answer to its own request
# --------------------------------------------------------------------------


def test_burst_of_2000_requests_each_gets_its_own_answer(proxy_defaults, up):
    """50 keep-alive callers, 2,000 requests; each answer must echo its own id (path, query, header, body).

    Run at the production defaults (2 workers x 32 threads): with threads=8 the worker's 16
    connection slots cannot hold 50 keep-alive callers (see test_idle_connections_do_not_stop_others).
    """
    proxy = proxy_defaults
    local = threading.local()
    connections = []
    lock = threading.Lock()

    def one(index: int):
        rid = f"{index:04d}-{new_id()}"
        if getattr(local, "conn", None) is None:
            local.conn = proxy.connection(timeout=30)
            with lock:
                connections.append(local.conn)
        try:
            response = send_echo(local.conn, "/r", rid)
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            local.conn.close()
            local.conn = None
            return f"{rid}: {type(exc).__name__}: {exc}"
        problem = echo_problem(response, data, rid)
        return problem and f"{rid}: {problem}"

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(50) as pool:
            problems = [p for p in pool.map(one, range(2000)) if p]
    finally:
        for conn in connections:
            conn.close()
    seconds = time.monotonic() - started
    print(f"\n[burst] 2000 requests, concurrency 50: {seconds:.1f} s, {len(problems)} failures")
    assert problems == [], problems[:10]
