"""Tests of OneWriteResponse (proxy_app/worker.py): the same response bytes as gunicorn's
Response, with the head leaving in the first body write.

Requests are parsed by gunicorn's own parser from a socketpair; responses are written to
one end of a SOCK_SEQPACKET pair, whose peer receives one message per sendall, so the
number of writes is visible as well as the bytes.
"""

from __future__ import annotations

import re
import socket
import tempfile

import pytest
from gunicorn.config import Config
from gunicorn.http import get_parser
from gunicorn.http import wsgi

from proxy_app.worker import OneWriteResponse
from tests.seqpacket import queued_messages
from tests.seqpacket import seqpacket_pair

P = pytest.param
CFG = Config()
GET_11 = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD_11 = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
GET_10 = b"GET /x HTTP/1.0\r\n\r\n"
DATE_LINE = re.compile(rb"\r\nDate: [^\r\n]*\r\n")


@pytest.fixture
def sockets():
    """Registers sockets to close after the test; returns the registering function."""
    opened = []

    def keep(*socks):
        for sock in socks:
            sock.settimeout(1)
        opened.extend(socks)
        return socks

    yield keep
    for sock in opened:
        sock.close()


def parse_request(sockets, raw: bytes):
    server_end, client_end = sockets(*socket.socketpair())
    client_end.sendall(raw)
    return next(get_parser(CFG, server_end, ("127.0.0.1", 1234)))


def start(sockets, raw, status, headers, writes, cls=OneWriteResponse):
    """A response driven as gthread does, up to (not including) close(); (resp, peer)."""
    req = parse_request(sockets, raw)
    out, peer = sockets(*seqpacket_pair())
    resp = cls(req, out, CFG)
    resp.start_response(status, list(headers))
    for data in writes:
        resp.write(data)
    return resp, peer


def respond(sockets, raw, status, headers, writes, cls=OneWriteResponse):
    """Drive a response as gthread does; the messages seen before and at close()."""
    resp, peer = start(sockets, raw, status, headers, writes, cls)
    before_close = queued_messages(peer)
    resp.close()
    return before_close, queued_messages(peer)


def head_of(status_line: bytes, *lines: bytes, connection=b"keep-alive") -> bytes:
    # gunicorn's default headers come first, the application's after them.
    fields = [b"Server: gunicorn", b"Connection: " + connection, *lines]
    return status_line + b"\r\n" + b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def without_date(data: bytes) -> bytes:
    # The Date value is the only part that depends on the clock; exactly one per head.
    stripped, count = DATE_LINE.subn(b"\r\n", data)
    assert count == 1, data
    return stripped


TEXT_5 = [("Content-Type", "text/plain"), ("Content-Length", "5")]


def test_head_and_body_in_one_write(sockets):
    before_close, at_close = respond(sockets, GET_11, "200 OK", TEXT_5, [b"hello"])
    assert len(before_close) == 1
    (message,) = before_close
    assert message.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain\r\n" in message
    assert b"\r\nContent-Length: 5\r\n" in message
    assert message.endswith(b"\r\n\r\nhello")
    assert without_date(message) == head_of(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: 5") + b"hello"
    assert at_close == []


def test_second_write_is_its_own_message(sockets):
    before_close, at_close = respond(sockets, GET_11, "200 OK", [("Content-Length", "7")], [b"hel", b"lo!!"])
    assert [without_date(before_close[0]), *before_close[1:]] == [
        head_of(b"HTTP/1.1 200 OK", b"Content-Length: 7") + b"hel",
        b"lo!!",
    ]
    assert at_close == []


def test_chunked_first_chunk_rides_with_the_head(sockets):
    before_close, at_close = respond(sockets, GET_11, "200 OK", [("Content-Type", "text/plain")], [b"hello", b"abcdefghijklmnopq"])
    assert [without_date(before_close[0]), *before_close[1:]] == [
        head_of(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Content-Type: text/plain") + b"5\r\nhello\r\n",
        b"11\r\nabcdefghijklmnopq\r\n",  # gunicorn's framing: hex size, uppercase
    ]
    assert at_close == [b"0\r\n\r\n"]


def test_chunk_size_hex_is_uppercase_in_the_first_write(sockets):
    before_close, _ = respond(sockets, GET_11, "200 OK", [], [b"x" * 0xAB])
    assert before_close[0].endswith(b"\r\n\r\nAB\r\n" + b"x" * 0xAB + b"\r\n")


def test_empty_chunked_write_does_not_end_the_body(sockets):
    # An empty chunk would be the terminator: gunicorn skips it, and the head stays held.
    before_close, at_close = respond(sockets, GET_11, "200 OK", [], [b"", b"hi"])
    assert [without_date(m) for m in before_close] == [
        head_of(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked") + b"2\r\nhi\r\n",
    ]
    assert at_close == [b"0\r\n\r\n"]


def test_http10_without_length_writes_head_and_body_once(sockets):
    before_close, at_close = respond(sockets, GET_10, "200 OK", [("Content-Type", "text/plain")], [b"hello"])
    assert [without_date(m) for m in before_close] == [
        head_of(b"HTTP/1.0 200 OK", b"Content-Type: text/plain", connection=b"close") + b"hello",
    ]
    assert at_close == []


@pytest.mark.parametrize(
    ("raw", "status", "headers", "writes", "expected_head"),
    [
        P(GET_11, "204 No Content", [("Content-Length", "0")], [], head_of(b"HTTP/1.1 204 No Content"), id="204-no-writes"),
        P(GET_11, "204 No Content", [], [b"dropped"], head_of(b"HTTP/1.1 204 No Content"), id="204-body-dropped"),
        P(GET_11, "304 Not Modified", [("ETag", '"e"')], [b""], head_of(b"HTTP/1.1 304 Not Modified", b'ETag: "e"'), id="304-empty-write"),
        P(HEAD_11, "200 OK", TEXT_5, [], head_of(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: 5"), id="head-no-writes"),
        P(HEAD_11, "200 OK", TEXT_5, [b"hello"], head_of(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: 5"), id="head-body-dropped"),
        P(GET_11, "200 OK", [("Content-Length", "0")], [b""], head_of(b"HTTP/1.1 200 OK", b"Content-Length: 0"), id="length-0-empty-write"),
        P(GET_11, "200 OK", [("Content-Length", "0")], [], head_of(b"HTTP/1.1 200 OK", b"Content-Length: 0"), id="length-0-no-writes"),
    ],
)
def test_response_without_body_bytes_sends_the_head_once_at_close(sockets, raw, status, headers, writes, expected_head):
    before_close, at_close = respond(sockets, raw, status, headers, writes)
    assert before_close == []
    assert [without_date(m) for m in at_close] == [expected_head]


def test_chunked_without_writes_ends_the_body_at_close(sockets):
    before_close, at_close = respond(sockets, GET_11, "200 OK", [("Content-Type", "text/plain")], [])
    assert before_close == []
    assert without_date(b"".join(at_close)) == head_of(
        b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Content-Type: text/plain"
    ) + b"0\r\n\r\n"


def test_write_past_content_length_is_cut_as_gunicorn_does(sockets):
    before_close, at_close = respond(sockets, GET_11, "200 OK", [("Content-Length", "3")], [b"abcdef", b"gh"])
    assert [without_date(m) for m in before_close] == [head_of(b"HTTP/1.1 200 OK", b"Content-Length: 3") + b"abc"]
    assert at_close == []


STOCK_CASES = [
    P(GET_11, "200 OK", TEXT_5, [b"hello"], id="length-one-write"),
    P(GET_11, "200 OK", [("Content-Length", "7"), ("X-A", "1"), ("x-a", "2")], [b"hel", b"lo!!"], id="length-two-writes"),
    P(GET_11, "200 OK", [("Content-Type", "text/plain")], [b"hello", b"world!"], id="chunked"),
    P(GET_11, "200 OK", [("Content-Type", "text/plain")], [], id="chunked-no-writes"),
    P(GET_11, "200 OK", [], [b"", b"hi"], id="chunked-empty-first-write"),
    P(GET_11, "201 Created", [("Location", "/y"), ("Connection", "close"), ("Content-Length", "2")], [b"ok"], id="hop-by-hop-dropped"),
    P(GET_11, "204 No Content", [("Content-Length", "0")], [], id="204"),
    P(GET_11, "304 Not Modified", [("ETag", '"e"')], [b""], id="304"),
    P(HEAD_11, "200 OK", TEXT_5, [b"hello"], id="head-request"),
    P(GET_10, "200 OK", [("Content-Type", "text/plain")], [b"hello", b"more"], id="http10-until-close"),
    P(GET_10, "200 OK", [("Content-Length", "5")], [b"hello"], id="http10-length"),
    P(GET_11, "200 OK", [("Content-Length", "0")], [b""], id="length-0"),
    P(GET_11, "200 OK", [("Content-Length", "3")], [b"abcdef", b"gh"], id="write-past-length"),
]


@pytest.mark.parametrize(("raw", "status", "headers", "writes"), STOCK_CASES)
def test_same_bytes_as_stock_gunicorn(sockets, raw, status, headers, writes):
    ours = b"".join(m for part in respond(sockets, raw, status, headers, writes) for m in part)
    stock = b"".join(m for part in respond(sockets, raw, status, headers, writes, cls=wsgi.Response) for m in part)
    assert without_date(ours) == without_date(stock)


@pytest.mark.parametrize(("raw", "status", "headers", "writes"), STOCK_CASES)
def test_never_more_writes_than_stock_gunicorn(sockets, raw, status, headers, writes):
    ours = respond(sockets, raw, status, headers, writes)
    stock = respond(sockets, raw, status, headers, writes, cls=wsgi.Response)
    assert len(ours[0]) + len(ours[1]) <= len(stock[0]) + len(stock[1])


def send_file(sockets, cls, raw=GET_11, headers=(("Content-Length", "8"),), data=b"filedata"):
    req = parse_request(sockets, raw)
    out, peer = sockets(*seqpacket_pair())
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.seek(0)
        resp = cls(req, out, CFG)
        resp.start_response("200 OK", list(headers))
        resp.write_file(wsgi.FileWrapper(file))
        before_close = queued_messages(peer)
        resp.close()
        return before_close, queued_messages(peer)


def test_sendfile_writes_the_head_before_the_file(sockets):
    # sendfile() copies the file kernel-side, so the head cannot ride with it: it goes first.
    before_close, at_close = send_file(sockets, OneWriteResponse)
    assert [without_date(before_close[0]), *before_close[1:]] == [
        head_of(b"HTTP/1.1 200 OK", b"Content-Length: 8"),
        b"filedata",
    ]
    assert at_close == []


@pytest.mark.parametrize(
    ("raw", "headers"),
    [
        P(GET_11, (("Content-Length", "8"),), id="length"),
        P(GET_11, (), id="chunked"),
        P(HEAD_11, (("Content-Length", "8"),), id="head-request"),
    ],
)
def test_sendfile_same_bytes_as_stock_gunicorn(sockets, raw, headers):
    ours = b"".join(m for part in send_file(sockets, OneWriteResponse, raw, headers) for m in part)
    stock = b"".join(m for part in send_file(sockets, wsgi.Response, raw, headers) for m in part)
    assert without_date(ours) == without_date(stock)


@pytest.mark.parametrize(
    ("raw", "status", "headers", "writes"),
    [
        P(HEAD_11, "200 OK", [("Content-Length", "5")], [b"hello"], id="head_request"),
        P(GET_11, "204 No Content", [], [b""], id="no_content"),
        P(GET_11, "200 OK", [("Content-Length", "0")], [b""], id="empty_body"),
    ],
)
def test_a_held_head_is_not_reported_sent(sockets, raw, status, headers, writes):
    """gthread answers 500 when the app fails before headers_sent; a held head is unsent."""
    resp, peer = start(sockets, raw, status, headers, writes)
    assert (resp.headers_sent, queued_messages(peer)) == (False, [])
    resp.close()
    assert resp.headers_sent
    assert len(queued_messages(peer)) == 1


def test_an_error_replaces_a_held_head(sockets):
    """PEP 3333: start_response with exc_info may replace a head that has not left yet."""
    resp, peer = start(sockets, GET_11, "200 OK", [("Content-Length", "0")], [b""])
    try:
        raise RuntimeError("app failed")
    except RuntimeError as exc:
        resp.start_response("500 Internal Server Error", [("Content-Length", "0")], (type(exc), exc, exc.__traceback__))
    resp.close()
    (message,) = queued_messages(peer)
    assert message.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
