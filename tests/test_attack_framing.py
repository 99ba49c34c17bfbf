"""Adversarial framing and header tests through the production stack, on raw sockets.

Real gunicorn (deploy/gunicorn.conf.py) in front of a recording raw-socket upstream. Every
request here is written byte for byte on a socket: an HTTP client library would refuse to
send most of these messages, or would tidy them up first.

The rules checked (README: "What is always sent upstream", "Security and hostile input"):

- a malformed request (smuggling pairs, bad lengths, obfuscated Transfer-Encoding, bad chunk
  sizes, control characters, bad names, oversized heads, refused methods) gets a 4xx or a
  closed connection: never a 5xx, never an upstream request;
- a truncated upload is never forwarded as complete;
- the upstream never receives both Content-Length and Transfer-Encoding;
- pipelined requests are answered in order, and a request hidden in a body stays body bytes;
- hop-by-hop headers are dropped both ways, X-Forwarded-For is appended to, `Proxy:` is
  never forwarded;
- no answer and no log line carries the injected secret or a Python traceback.

One gunicorn and one upstream serve the whole module; the upstream's records are cleared
before each test. Every socket operation has a timeout and every loop is bounded.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from dataclasses import field

import pytest

from proxy_app.config import ConfigError
from proxy_app.config import load_config
from tests.conftest import SECRET
from tests.conftest import config_for
from tests.conftest import subprocess_env
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream
from tests.upstream import fixed

IO_TIMEOUT = 5.0  # bound for one exchange with the proxy
QUIET = 0.3  # how long "nothing reached the upstream" is watched for
MAX_REPLY = 1024 * 1024  # a reply larger than this is not read further
PEER = "127.0.0.1"

HOP_RESPONSE_HEADERS = [
    ("Content-Type", "text/plain"),
    ("Connection", "close, X-Hop"),
    ("X-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Upgrade", "h2c"),
    ("Trailer", "X-T"),
    ("X-End-To-End", "kept"),
]


# --------------------------------------------------------------------------
# Module fixtures: one upstream, one gunicorn
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up():
    with Upstream() as server:
        server.route("/hop", fixed(200, HOP_RESPONSE_HEADERS, b"hop-ok"))
        yield server


@pytest.fixture(scope="module")
def proxy(up, tmp_path_factory):
    secret_header = {"Authorization": "Bearer os.environ/SECRET"}
    config = config_for(
        {"path": "/p", "target": up.url + "/t", "forward_headers": True, "headers": secret_header},
        {"path": "/hop", "target": up.url + "/hop", "forward_headers": True, "headers": secret_header},
        {"path": "/getpost", "target": up.url + "/g", "methods": ["GET", "POST"], "headers": secret_header},
    )
    path = write_config(tmp_path_factory.mktemp("attack-framing"), config)
    with run_gunicorn(path, subprocess_env(), workers=1, threads=8) as server:
        yield server


@pytest.fixture
def h(up, proxy):
    harness = Harness(up, proxy)
    harness.reset()
    return harness


# --------------------------------------------------------------------------
# Raw HTTP on a socket
# --------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    head: bytes
    headers: list  # list[tuple[str, str]], order and case kept
    body: bytes

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]


@dataclass
class Reply:
    raw: bytes
    closed: bool  # EOF or reset seen
    timed_out: bool
    send_error: str | None
    responses: list = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def describe(self) -> str:
        return (
            f"statuses={self.statuses} closed={self.closed} timed_out={self.timed_out} "
            f"send_error={self.send_error} raw={self.raw[:300]!r}"
        )


def build(method=b"GET", target=b"/p", version=b"HTTP/1.1", headers=(), body=b"", host=True) -> bytes:
    lines = [b"%s %s %s" % (method, target, version)]
    if host:
        lines.append(b"Host: proxy.test")
    lines += list(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _parse_head(head: bytes) -> tuple[int, list]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    return status, headers


def parse_responses(buf: bytes, closed: bool) -> list[Resp]:
    """Complete responses at the start of ``buf`` (the requests were not HEAD)."""
    out = []
    pos = 0
    for _ in range(64):  # bounded: never more responses than that in one exchange
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0 or not buf.startswith(b"HTTP/", pos):
            break
        head = buf[pos : end + 4]
        status, headers = _parse_head(head[:-4])
        names = {k.lower(): v for k, v in headers}
        rest = end + 4
        if 100 <= status < 200 or status in (204, 304):
            body, pos = b"", rest
        elif "chunked" in names.get("transfer-encoding", "").lower():
            body, cursor = b"", rest
            while True:
                line_end = buf.find(b"\r\n", cursor)
                if line_end < 0:
                    return out
                size = int(buf[cursor:line_end].split(b";")[0], 16)
                if size == 0:
                    trailer_end = buf.find(b"\r\n\r\n", line_end)
                    if trailer_end < 0:
                        return out
                    pos = trailer_end + 4
                    break
                if len(buf) < line_end + 2 + size + 2:
                    return out
                body += buf[line_end + 2 : line_end + 2 + size]
                cursor = line_end + 2 + size + 2
        elif "content-length" in names:
            length = int(names["content-length"])
            if len(buf) < rest + length:
                return out
            body, pos = buf[rest : rest + length], rest + length
        else:
            if not closed:
                return out
            body, pos = buf[rest:], len(buf)
        out.append(Resp(status, head, headers, body))
    return out


def exchange(port: int, data: bytes, *, shut_write: bool = True, expect: int | None = None, timeout: float = IO_TIMEOUT) -> Reply:
    """Send ``data`` raw, then read until EOF (or ``expect`` full responses), within ``timeout``.

    With ``shut_write`` the write side is closed after sending, so a server waiting for more
    bytes sees EOF instead of hanging the test.
    """
    deadline = time.monotonic() + timeout
    buf = b""
    closed = timed_out = False
    send_error = None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the server may refuse and close before all was sent
            send_error = type(exc).__name__
        while True:
            if expect is not None and len(parse_responses(buf, False)) >= expect:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                timed_out = True
                break
            except OSError:  # reset
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                break
    return Reply(buf, closed, timed_out, send_error, parse_responses(buf, closed))


def send_and_close(port: int, data: bytes) -> None:
    """Send ``data`` and close the socket at once (the caller vanishes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(data)


# --------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------


class Harness:
    def __init__(self, up: Upstream, proxy):
        self.up = up
        self.proxy = proxy
        self.port = proxy.port
        self.log_start = 0

    def reset(self) -> None:
        with self.up._changed:
            self.up.requests.clear()
            self.up.errors.clear()
            self.up.disconnects.clear()
        self.opened_at_start = self.up.connections_opened
        self.log_start = len(self.proxy.log())

    def send(self, data: bytes, **kwargs) -> Reply:
        reply = exchange(self.port, data, **kwargs)
        assert_no_leak(reply.raw)
        return reply

    def new_log(self) -> str:
        return self.proxy.log()[self.log_start :]

    def assert_clean(self) -> None:
        """Invariants for every test: framing sent upstream, log free of tracebacks and secrets."""
        for seen in self.up.requests:
            names = seen.names()
            assert not ("content-length" in names and "transfer-encoding" in names), seen.raw_head
            assert names.count("content-length") <= 1 and names.count("transfer-encoding") <= 1, seen.raw_head
        log = self.new_log()
        assert "Traceback" not in log, log
        assert SECRET not in log, log

    def assert_nothing_upstream(self, strict: bool = True) -> None:
        """Nothing reaches the upstream within QUIET seconds.

        ``strict``: not even a request head (which the upstream notes as a rejected or
        abandoned request, or a new connection); otherwise only no complete request.
        """
        time.sleep(QUIET)
        assert self.up.requests == [], [r.raw_head for r in self.up.requests]
        if strict:
            assert self.up.errors == [], self.up.errors
            assert self.up.disconnects == [], self.up.disconnects
            assert self.up.connections_opened == self.opened_at_start
        self.assert_clean()

    def assert_refused(self, reply: Reply, strict: bool = True) -> None:
        """4xx or a closed connection, never a 5xx, never an upstream request."""
        assert not reply.timed_out, "no answer and the connection left open: " + reply.describe()
        assert reply.responses or reply.closed, reply.describe()
        assert all(status < 500 for status in reply.statuses), reply.describe()
        if reply.responses:
            assert 400 <= reply.statuses[0] < 500, reply.describe()
            # Nothing after the refusal was parsed as a further request.
            assert len(reply.responses) == 1, reply.describe()
        elif reply.raw:
            # Bytes that are not a complete response: at least never a 5xx status line.
            assert not reply.raw.startswith((b"HTTP/1.1 5", b"HTTP/1.0 5")), reply.describe()
        self.assert_nothing_upstream(strict)

    def one_upstream_request(self):
        seen = self.up.wait_for_requests(1)
        time.sleep(QUIET)
        assert len(self.up.requests) == 1, [r.raw_head for r in self.up.requests]
        return seen[0]


def assert_no_leak(raw: bytes) -> None:
    assert SECRET.encode() not in raw, raw[:500]
    assert b"Traceback" not in raw, raw[:500]


def row(id_, *values):
    return pytest.param(*values, id=id_)


SMUGGLED = b"0\r\n\r\nGET /p HTTP/1.1\r\nHost: proxy.test\r\n\r\n"  # a request hidden after a chunked end


# --------------------------------------------------------------------------
# Content-Length together with Transfer-Encoding
# --------------------------------------------------------------------------

TE_SPELLINGS = [
    row("plain", b"Transfer-Encoding: chunked"),
    row("leading-space", b"Transfer-Encoding:  chunked"),
    row("capitalised", b"Transfer-Encoding: Chunked"),
    row("trailing-space", b"Transfer-Encoding: chunked "),
    row("xchunked", b"Transfer-Encoding: xchunked"),
    row("chunked-identity", b"Transfer-Encoding: chunked, identity"),
    row("identity-chunked", b"Transfer-Encoding: identity, chunked"),
    row("tab-before-value", b"Transfer-Encoding:\tchunked"),
    row("space-before-colon", b"Transfer-Encoding : chunked"),
    row("duplicated-lines", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
    row("identity-line-then-chunked-line", b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked"),
    row("lowercase-name", b"transfer-encoding: chunked"),
    row("vertical-tab", b"Transfer-Encoding:\x0bchunked"),
]


@pytest.mark.parametrize("te_line", TE_SPELLINGS)
@pytest.mark.parametrize("te_first", [False, True], ids=["cl-first", "te-first"])
def test_content_length_with_transfer_encoding_is_refused(h, te_line, te_first):
    cl_line = b"Content-Length: %d" % len(SMUGGLED)
    headers = [te_line, cl_line] if te_first else [cl_line, te_line]
    reply = h.send(build(b"POST", b"/p", headers=headers, body=SMUGGLED))
    h.assert_refused(reply)


# --------------------------------------------------------------------------
# Content-Length alone: duplicated, invalid
# --------------------------------------------------------------------------

DUPLICATE_CL = [
    row("same-value-twice", [b"Content-Length: 5", b"Content-Length: 5"]),
    row("different-values", [b"Content-Length: 5", b"Content-Length: 6"]),
    row("list-same-values", [b"Content-Length: 5, 5"]),
    row("list-different-values", [b"Content-Length: 5, 6"]),
    row("different-name-case", [b"Content-Length: 5", b"content-length: 6"]),
]


@pytest.mark.parametrize("cl_lines", DUPLICATE_CL)
def test_duplicate_content_length_is_refused(h, cl_lines):
    reply = h.send(build(b"POST", b"/p", headers=cl_lines, body=b"hello!"))
    h.assert_refused(reply)


INVALID_CL = [
    row("negative", b"-1"),
    row("plus-sign", b"+5"),
    row("hex", b"0x10"),
    row("two-numbers", b"5 5"),
    row("empty", b""),
    row("huge", b"99999999999999999999"),
    row("decimal-point", b"5.0"),
    row("exponent", b"1e1"),
    row("superscript-digit", b"\xb2"),
    row("nul-suffix", b"5\x00"),
]


@pytest.mark.parametrize("value", INVALID_CL)
def test_invalid_content_length_is_refused(h, value):
    reply = h.send(build(b"POST", b"/p", headers=[b"Content-Length: " + value], body=b"hello"))
    h.assert_refused(reply)


# --------------------------------------------------------------------------
# Transfer-Encoding alone
# --------------------------------------------------------------------------

OBFUSCATED_TE = [
    row("xchunked", [b"Transfer-Encoding: xchunked"]),
    row("chunked-identity", [b"Transfer-Encoding: chunked, identity"]),
    row("identity-chunked", [b"Transfer-Encoding: identity, chunked"]),
    row("gzip-chunked", [b"Transfer-Encoding: gzip, chunked"]),
    row("gzip-only", [b"Transfer-Encoding: gzip"]),
    row("chunked-chunked", [b"Transfer-Encoding: chunked, chunked"]),
    row("space-before-colon", [b"Transfer-Encoding : chunked"]),
    row("duplicated-lines", [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"]),
    row("identity-line-then-chunked-line", [b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"]),
    row("chunked-with-parameter", [b"Transfer-Encoding: chunked;q=1"]),
    row("vertical-tab", [b"Transfer-Encoding:\x0bchunked"]),
    row("empty-value", [b"Transfer-Encoding: "]),
    row("leading-comma", [b"Transfer-Encoding: ,chunked"]),
    row("nul-suffix", [b"Transfer-Encoding: chunked\x00"]),
]


@pytest.mark.parametrize("te_lines", OBFUSCATED_TE)
def test_obfuscated_transfer_encoding_is_refused(h, te_lines):
    reply = h.send(build(b"POST", b"/p", headers=te_lines, body=SMUGGLED))
    h.assert_refused(reply)


LEGAL_TE = [
    row("plain", b"Transfer-Encoding: chunked"),
    row("capitalised-value", b"Transfer-Encoding: Chunked"),
    row("upper-case", b"TRANSFER-ENCODING: CHUNKED"),
    row("leading-space", b"Transfer-Encoding:  chunked"),
    row("trailing-space", b"Transfer-Encoding: chunked "),
    row("tab-before-value", b"Transfer-Encoding:\tchunked"),
]


@pytest.mark.parametrize("te_line", LEGAL_TE)
def test_legal_chunked_spellings_are_forwarded_as_plain_chunked(h, te_line):
    """Field names and transfer-coding names are case-insensitive, and the whitespace around
    a field value is not part of it (RFC 9110 §5.1, §5.5; RFC 9112 §5, §7): each spelling is
    plain chunked framing from a legal client. gunicorn accepts them all, and the proxy must
    forward each as a plain chunked request with the same body bytes, never refuse it."""
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    reply = h.send(build(b"POST", b"/p", headers=[te_line], body=body))
    assert reply.statuses == [200], reply.describe()
    seen = h.one_upstream_request()
    assert seen.chunked and seen.body == b"hello world"
    assert seen.header_all("transfer-encoding") == ["chunked"]
    assert seen.header("content-length") is None
    h.assert_clean()


@pytest.mark.parametrize(
    "headers",
    [
        row("chunked", [b"Transfer-Encoding: chunked"]),
        row("chunked-and-length", [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(SMUGGLED)]),
    ],
)
def test_http10_with_transfer_encoding_is_refused(h, headers):
    reply = h.send(build(b"POST", b"/p", version=b"HTTP/1.0", headers=headers, body=SMUGGLED))
    h.assert_refused(reply)


# --------------------------------------------------------------------------
# Bad chunk sizes and truncated uploads (the body is streamed: checked while forwarding)
# --------------------------------------------------------------------------

BAD_CHUNKS = [
    row("non-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    row("negative", b"-1\r\nhello\r\n0\r\n\r\n"),
    row("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    row("plus-sign", b"+5\r\nhello\r\n0\r\n\r\n"),
    row("huge", b"ffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    row("missing-crlf-after-data", b"5\r\nhello0\r\n\r\n"),
    row("bare-lf", b"5\nhello\n0\n\n"),
    row("second-chunk-bad", b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("body", BAD_CHUNKS)
def test_bad_chunk_size_is_refused_and_never_completed_upstream(h, body):
    reply = h.send(build(b"POST", b"/p", headers=[b"Transfer-Encoding: chunked"], body=body))
    # A chunk error can only be seen while the body streams, after the upstream request
    # began: the upstream must never get a complete request (strict=False).
    h.assert_refused(reply, strict=False)


TRUNCATED = [
    row("content-length-shutdown-write", [b"Content-Length: 1000"], b"a" * 100, "shutdown"),
    row("content-length-close", [b"Content-Length: 1000"], b"a" * 100, "close"),
    row("chunked-shutdown-write", [b"Transfer-Encoding: chunked"], b"64\r\n" + b"a" * 100 + b"\r\n", "shutdown"),
    row("chunked-close", [b"Transfer-Encoding: chunked"], b"64\r\n" + b"a" * 100 + b"\r\n", "close"),
    row("chunked-mid-chunk-shutdown-write", [b"Transfer-Encoding: chunked"], b"3e8\r\n" + b"a" * 100, "shutdown"),
]


@pytest.mark.parametrize(("headers", "sent", "how"), TRUNCATED)
def test_truncated_upload_is_never_forwarded_as_complete(h, headers, sent, how):
    data = build(b"POST", b"/p", headers=headers, body=sent)
    if how == "close":
        send_and_close(h.port, data)
    else:
        reply = h.send(data)
        assert not reply.timed_out, reply.describe()
        assert reply.responses or reply.closed, reply.describe()
        assert all(400 <= status < 500 for status in reply.statuses), reply.describe()
    time.sleep(2 * QUIET)
    # The upstream records a request only once its body is complete by its own framing
    # (Content-Length read in full, or the last chunk seen). So any record at all would be
    # a truncated upload presented as complete, whatever its length.
    assert not [r for r in h.up.requests if r.body_len == 1000]
    assert h.up.requests == [], [(r.raw_head, r.body_len) for r in h.up.requests]
    h.assert_clean()


# --------------------------------------------------------------------------
# Pipelining and requests hidden in bodies
# --------------------------------------------------------------------------

PIPELINED = [
    row(
        "two-content-length-posts",
        build(b"POST", b"/p", headers=[b"Content-Length: 5"], body=b"first")
        + build(b"POST", b"/p", headers=[b"Content-Length: 7"], body=b"second!"),
        [("POST", b"first"), ("POST", b"second!")],
    ),
    row(
        "get-then-chunked-post",
        build(b"GET", b"/p?n=1") + build(b"POST", b"/p?n=2", headers=[b"Transfer-Encoding: chunked"], body=b"7\r\nsecond!\r\n0\r\n\r\n"),
        [("GET", b""), ("POST", b"second!")],
    ),
]


@pytest.mark.parametrize(("data", "expected"), PIPELINED)
@pytest.mark.parametrize("shut_write", [False, True], ids=["open", "half-closed"])
def test_pipelined_requests_are_answered_in_order(h, data, expected, shut_write):
    reply = h.send(data, shut_write=shut_write, expect=2)
    assert reply.statuses == [200, 200], reply.describe()
    echoed = [json.loads(r.body) for r in reply.responses]
    assert [(e["method"], e["body_len"]) for e in echoed] == [(m, len(b)) for m, b in expected]
    h.up.wait_for_requests(2)
    time.sleep(QUIET)
    assert [(r.method, r.path, r.body) for r in h.up.requests] == [(m, "/t", b) for m, b in expected]
    h.assert_clean()


HIDDEN = b"GET /p HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
HIDDEN_POST = b"POST /p HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\n\r\nabc"

BODY_HIDDEN = [
    row("content-length-body-holds-get", [b"Content-Length: %d" % len(HIDDEN)], HIDDEN, HIDDEN),
    row(
        "content-length-body-holds-chunk-end-and-post",
        [b"Content-Length: %d" % len(b"0\r\n\r\n" + HIDDEN_POST)],
        b"0\r\n\r\n" + HIDDEN_POST,
        b"0\r\n\r\n" + HIDDEN_POST,
    ),
    row(
        "chunked-body-holds-post",
        [b"Transfer-Encoding: chunked"],
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN_POST), HIDDEN_POST),
        HIDDEN_POST,
    ),
]


@pytest.mark.parametrize(("headers", "body", "forwarded"), BODY_HIDDEN)
def test_request_hidden_in_a_body_stays_body_bytes(h, headers, body, forwarded):
    reply = h.send(build(b"POST", b"/p", headers=headers, body=body), expect=1)
    assert reply.statuses == [200], reply.describe()
    seen = h.one_upstream_request()
    assert (seen.method, seen.path, seen.body) == ("POST", "/t", forwarded)
    # Half-closed this time, read to EOF: still exactly one answer, one upstream request.
    rest = h.send(build(b"POST", b"/p", headers=headers, body=body))
    assert rest.statuses == [200], rest.describe()
    h.up.wait_for_requests(2)
    time.sleep(QUIET)
    assert [(r.method, r.path, r.body) for r in h.up.requests] == [("POST", "/t", forwarded)] * 2
    h.assert_clean()


# --------------------------------------------------------------------------
# Malformed header lines, bad names, oversized heads
# --------------------------------------------------------------------------

BAD_HEADER_LINES = [
    row("cr-in-value", [b"X-A: a\rb"]),
    row("lf-in-value", [b"X-A: a\nb"]),
    row("lf-smuggles-transfer-encoding", [b"X-A: a\nTransfer-Encoding: chunked"]),
    row("nul-in-value", [b"X-A: a\x00b"]),
    row("obs-fold-space", [b"X-A: a", b" b"]),
    row("obs-fold-tab", [b"X-A: a", b"\tb"]),
    row("soh-in-value", [b"X-A: a\x01b"]),
    row("esc-in-value", [b"X-A: a\x1bb"]),
    row("del-in-value", [b"X-A: a\x7fb"]),
    row("space-in-name", [b"X A: 1"]),
    row("parentheses-name", [b"(x): 1"]),
    row("empty-name", [b": 1"]),
    row("space-before-colon", [b"X-A : 1"]),
    row("tab-before-colon", [b"X-A\t: 1"]),
    row("latin1-name", [b"X\xe9: 1"]),
    row("utf8-name", [b"X-\xc3\xa9: 1"]),
    row("nul-in-name", [b"X\x00A: 1"]),
    row("no-colon", [b"X-A 1"]),
]


@pytest.mark.parametrize("lines", BAD_HEADER_LINES)
def test_malformed_header_line_is_refused(h, lines):
    reply = h.send(build(b"GET", b"/p", headers=lines))
    h.assert_refused(reply)


def test_whitespace_before_first_header_is_refused(h):
    # RFC 9112 §2.2: a line starting with whitespace right after the request line.
    reply = h.send(b"GET /p HTTP/1.1\r\n X-A: 1\r\nHost: proxy.test\r\n\r\n")
    h.assert_refused(reply)


def test_colon_inside_value_is_a_value(h):
    # "X:A: 1" is the field "X" with value "A: 1": refusing it or forwarding it so is fine.
    reply = h.send(build(b"GET", b"/p", headers=[b"X:A: 1"]))
    assert not reply.timed_out and all(status < 500 for status in reply.statuses), reply.describe()
    if reply.statuses and reply.statuses[0] < 400:
        seen = h.one_upstream_request()
        assert seen.header_all("x") == ["A: 1"]
        h.assert_clean()
    else:
        h.assert_refused(reply)


OVERSIZED = [
    row("request-line-10k", build(b"GET", b"/p?" + b"a" * 10_000)),
    row("one-20k-header", build(b"GET", b"/p", headers=[b"X-Big: " + b"a" * 20_000])),
    row("200-headers", build(b"GET", b"/p", headers=[b"X-H%d: v" % i for i in range(200)])),
    row("99-headers-of-8k", build(b"GET", b"/p", headers=[b"X-H%d: " % i + b"a" * 8000 for i in range(99)])),
]


@pytest.mark.parametrize("data", OVERSIZED)
def test_oversized_head_is_refused(h, data):
    reply = h.send(data)
    h.assert_refused(reply)


# --------------------------------------------------------------------------
# Hop-by-hop headers, X-Forwarded-For, httpoxy
# --------------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_dropped(h):
    lines = [
        b"Connection: keep-alive, X-Custom-Hop, x-other-HOP",
        b"Keep-Alive: timeout=5",
        b"TE: trailers",
        b"Trailer: X-T",
        b"Upgrade: websocket",
        b"Proxy-Connection: keep-alive",
        b"Proxy-Authorization: Basic dXNlcjpwYXNz",
        b"X-Custom-Hop: 1",
        b"X-Other-Hop: 1",
        b"X-End-To-End: kept",
    ]
    reply = h.send(build(b"GET", b"/p", headers=lines), expect=1)
    assert reply.statuses == [200], reply.describe()
    seen = h.one_upstream_request()
    dropped = {
        "connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection", "proxy-authorization", "x-custom-hop", "x-other-hop"
    }
    assert dropped.isdisjoint(seen.names()), seen.raw_head
    assert seen.header_all("x-end-to-end") == ["kept"]
    assert seen.header_all("authorization") == [f"Bearer {SECRET}"]
    h.assert_clean()


def test_hop_by_hop_response_headers_are_dropped(h):
    reply = h.send(build(b"GET", b"/hop"), expect=1)
    assert reply.statuses == [200], reply.describe()
    response = reply.responses[0]
    assert response.body == b"hop-ok"
    for name in ("x-hop", "keep-alive", "proxy-authenticate", "upgrade", "trailer"):
        assert name not in response.names(), response.head
    # gunicorn writes its own Connection header for this hop; the upstream's never passes.
    assert all("x-hop" not in value.lower() for value in response.header_all("connection")), response.head
    assert response.header_all("x-end-to-end") == ["kept"]
    h.one_upstream_request()
    h.assert_clean()


XFF = [
    row("single", [b"X-Forwarded-For: 6.6.6.6"], ["6.6.6.6", PEER]),
    row("repeated-lines", [b"X-Forwarded-For: 1.1.1.1", b"X-Forwarded-For: 2.2.2.2"], ["1.1.1.1", "2.2.2.2", PEER]),
    row("lower-case", [b"x-forwarded-for: 6.6.6.6"], ["6.6.6.6", PEER]),
    row("empty-value", [b"X-Forwarded-For: "], [PEER]),
    row("x-pass-rename", [b"x-pass-X-Forwarded-For: 9.9.9.9"], [PEER]),
    row("underscore-name", [b"X_Forwarded_For: 6.6.6.6"], [PEER]),
    row("none", [], [PEER]),
    row(
        "with-forwarded-host-and-proto",
        [
            b"X-Forwarded-For: 6.6.6.6",
            b"X-Forwarded-Host: evil.test",
            b"X-Forwarded-Proto: https",
            b"Forwarded: for=6.6.6.6;host=evil.test",
        ],
        ["6.6.6.6", PEER],
    ),
]


@pytest.mark.parametrize(("lines", "chain"), XFF)
def test_x_forwarded_for_is_appended_never_trusted(h, lines, chain):
    reply = h.send(build(b"GET", b"/p", headers=lines), expect=1)
    assert reply.statuses == [200], reply.describe()
    seen = h.one_upstream_request()
    values = seen.header_all("x-forwarded-for")
    assert len(values) == 1, seen.raw_head
    assert [part.strip() for part in values[0].split(",")] == chain
    for name in ("x-forwarded-host", "x-forwarded-proto", "forwarded", "x_forwarded_for"):
        assert name not in seen.names(), seen.raw_head
    h.assert_clean()


HTTPOXY = [
    row("proxy", [b"Proxy: http://127.0.0.1:1/"]),
    row("lower-case", [b"proxy: http://127.0.0.1:1/"]),
    row("x-pass-rename", [b"x-pass-proxy: http://127.0.0.1:1/"]),
    row("listed-in-connection", [b"Connection: Proxy", b"Proxy: http://127.0.0.1:1/"]),
]


@pytest.mark.parametrize("lines", HTTPOXY)
def test_proxy_header_is_never_forwarded(h, lines):
    reply = h.send(build(b"GET", b"/p", headers=lines), expect=1)
    # The request still reaches the configured target, not the named proxy.
    assert reply.statuses == [200], reply.describe()
    seen = h.one_upstream_request()
    assert seen.path == "/t"
    assert "proxy" not in seen.names(), seen.raw_head
    h.assert_clean()


# --------------------------------------------------------------------------
# TRACE, CONNECT and invalid methods
# --------------------------------------------------------------------------

METHODS = [
    row("trace", b"TRACE /p HTTP/1.1"),
    row("trace-on-get-post-path", b"TRACE /getpost HTTP/1.1"),
    row("trace-asterisk", b"TRACE * HTTP/1.1"),
    row("connect-origin-form", b"CONNECT /p HTTP/1.1"),
    row("connect-authority-form", b"CONNECT example.com:443 HTTP/1.1"),
    row("connect-authority-form-upstream", b"CONNECT 127.0.0.1:{port} HTTP/1.1"),
    row("trace-lower-case", b"trace /p HTTP/1.1"),
    row("track", b"TRACK /p HTTP/1.1"),
    row("invalid-method-chars", b"G@T /p HTTP/1.1"),
    row("nul-in-method", b"GE\x00T /p HTTP/1.1"),
]


@pytest.mark.parametrize("request_line", METHODS)
def test_trace_connect_and_invalid_methods_never_reach_upstream(h, request_line):
    request_line = request_line.replace(b"{port}", str(h.up.port).encode())
    data = request_line + b"\r\nHost: proxy.test\r\nX-Echo: reflect-me\r\nMax-Forwards: 1\r\n\r\n"
    reply = h.send(data)
    h.assert_refused(reply)


@pytest.mark.parametrize(
    "methods",
    [row("trace", ["TRACE"]), row("trace-lower-case", ["trace"]), row("get-and-connect", ["GET", "CONNECT"])],
)
def test_config_with_trace_or_connect_is_refused_at_start(methods):
    config = config_for({"path": "/x", "target": "http://127.0.0.1:9/x", "methods": methods})
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={"SECRET": SECRET})
    assert "methods" in str(caught.value)


# --------------------------------------------------------------------------
# Last: the server log of the whole module
# --------------------------------------------------------------------------


def test_zz_gunicorn_log_has_no_traceback_or_secret(proxy):
    log = proxy.log()
    assert SECRET not in log, log
    assert "Traceback" not in log, log
