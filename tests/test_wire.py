"""Tests of proxy_app/wire.py: the fast head parser and the one-write request connection.

Both pieces promise "the same bytes, less work", so every test compares against what the
standard path produces: the email feed parser for heads, exact request bytes for writes.
"""

from __future__ import annotations

import email.parser
import http.client
import io
import socket

import pytest
import urllib3

import proxy_app.upstream  # noqa: F401 - installs wire.parse_headers, as in production
from proxy_app import wire
from tests.seqpacket import queued_messages
from tests.seqpacket import seqpacket_pair

P = pytest.param
SKIP = urllib3.util.SKIP_HEADER


def stdlib_parse(head: bytes) -> http.client.HTTPMessage:
    # The body of the original http.client.parse_headers: the module attribute itself is
    # already replaced by wire.install() at this point, so it cannot be the reference.
    return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(head.decode("iso-8859-1"))


def head_lines(head: bytes) -> list[bytes]:
    return http.client._read_headers(io.BytesIO(head))


# -- parse_headers: same HTTPMessage as the feed parser ------------------------------

PLAIN_HEADS = [
    P(b"Content-Type: application/json\r\nContent-Length: 7\r\nServer: up\r\n\r\n", id="several-fields"),
    P(b"Set-Cookie: a=1; Path=/\r\nX-Other: o\r\nSet-Cookie: b=2; HttpOnly\r\nSet-Cookie: c=3\r\n\r\n", id="repeated-set-cookie"),
    P(b"X-Empty:\r\nX-After: v\r\n\r\n", id="empty-value"),
    P(b"X-Blank: \r\n\r\n", id="value-only-space"),
    P(b"X-V: a  b\tc \t d\r\n\r\n", id="internal-spaces-and-tabs"),
    P(b"X-V: abc   \r\n\r\n", id="trailing-spaces"),
    P(b"X-V: abc\t\r\n\r\n", id="trailing-tab"),
    P(b"X-V:abc\r\n\r\n", id="no-space-after-colon"),
    P(b"X-V:\tabc\r\n\r\n", id="tab-after-colon"),
    P(b"X-V: \t  \tabc\r\n\r\n", id="mixed-leading-whitespace"),
    P(b"Content-Type: text/plain\nContent-Length: 2\n\n", id="lf-only"),
    P(b"A: 1\nB: 2\r\nC: 3\n\r\n", id="mixed-line-ends"),
    P(b"content-TYPE: text/html\r\nX-MiXeD-CaSe: v\r\nx-mixed-case: w\r\n\r\n", id="mixed-case-names"),
    P(b"\r\n", id="no-fields-crlf"),
    P(b"\n", id="no-fields-lf"),
    P(b"Location: http://a.test:8080/x?y=1#z\r\n\r\n", id="colons-in-value"),
    P(b"Set-Cookie: id=a3f; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Secure\r\n\r\n", id="cookie-with-date"),
    P(b"X-a.b_c!#$%&'*+^`|~-9: v\r\n\r\n", id="token-punctuation-in-name"),
    P(b'X-Q: "quoted, value"; p=(c) <a@b> [x] {y} \\ /\r\n\r\n', id="punctuation-in-value"),
    P(b"X-All: " + bytes(range(0x20, 0x7F)) + b"\r\n\r\n", id="every-visible-ascii-byte"),
    P(b"Content-Type: text/plain; charset=utf-8\r\n\r\n", id="text-content-type"),
    P(b"From: someone\r\n\r\n", id="from-field-with-colon"),
    P(b"WWW-Authenticate: Basic realm=\"x\"\r\nWWW-Authenticate: Bearer\r\n\r\n", id="repeated-www-authenticate"),
    P(b"X-Long: " + b"v" * 8000 + b"\r\n\r\n", id="long-value"),
    P(b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(99)) + b"\r\n", id="99-fields-at-line-limit"),
]

# Heads that plain_fields must refuse, so that the feed parser (and its defects) decides.
FALLBACK_HEADS = [
    P(b"X-A: a\r\n b\r\nX-B: c\r\n\r\n", id="folded-space"),
    P(b"X-A: a\r\n\tb\r\n\r\n", id="folded-tab"),
    P(b" X-A: a\r\n\r\n", id="first-line-starts-with-space"),
    P(b"X-A: caf\xe9\r\n\r\n", id="latin-1-byte-in-value"),
    P(b"X-\xe9: v\r\n\r\n", id="latin-1-byte-in-name"),
    P(b"X-A: a\x7fb\r\n\r\n", id="del-byte-in-value"),
    P(b"X-A: a\x00b\r\n\r\n", id="nul-byte-in-value"),
    P(b"X-A: a\rb\r\n\r\n", id="bare-cr-in-value"),
    P(b"X-A: a\r\r\n\r\n", id="cr-before-crlf"),
    P(b"X-A : v\r\n\r\n", id="space-before-colon"),
    P(b"X-A: v\r\nNoColonHere\r\nX-B: w\r\n\r\n", id="line-without-colon"),
    P(b":x\r\n\r\n", id="empty-name"),
    P(b"From nobody Mon Jan  1 00:00:00 2024\r\nX-A: v\r\n\r\n", id="unix-from-line"),
    P(b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n", id="multipart-form-data"),
    P(b"Content-Type: multipart/mixed\r\n\r\n", id="multipart-without-boundary"),
    P(b"Content-Type: message/rfc822\r\n\r\n", id="message-rfc822"),
    P(b"content-type: Message/HTTP\r\n\r\n", id="message-mixed-case"),
    P(b"Content-Type: message/delivery-status\r\n\r\n", id="message-delivery-status"),
    P(b"X-A: v\r\nX-B: w\r\n", id="eof-without-empty-line"),
    P(b"X-A: v", id="eof-mid-line"),
    P(b"", id="empty-input"),
]


def snapshot(message) -> dict:
    """vars(message), comparable by value.

    Defects are exception instances and sub-messages (message/rfc822 payloads) are Message
    objects; neither compares by value, so they are taken apart here.
    """
    state = dict(vars(message))
    state["defects"] = [(type(defect), defect.args) for defect in message.defects]
    if isinstance(message._payload, list):
        state["_payload"] = [(type(part), snapshot(part)) for part in message._payload]
    return state


def assert_same_message(ours: http.client.HTTPMessage, theirs: http.client.HTTPMessage) -> None:
    assert type(ours) is type(theirs)
    assert snapshot(ours) == snapshot(theirs)
    assert ours.items() == theirs.items()
    assert snapshot(ours)["defects"] == snapshot(theirs)["defects"]
    assert snapshot(ours)["_payload"] == snapshot(theirs)["_payload"]
    assert ours.is_multipart() == theirs.is_multipart()
    for name in {key.lower() for key in theirs} | {"set-cookie", "absent"}:
        assert ours.get_all(name) == theirs.get_all(name)


@pytest.mark.parametrize("head", PLAIN_HEADS)
def test_plain_head_parses_as_the_feed_parser_does(head):
    assert wire.plain_fields(head_lines(head)) is not None
    ours, theirs = wire.parse_headers(io.BytesIO(head)), stdlib_parse(head)
    # A plain head has no defects and a str payload: the raw attributes compare as they are.
    assert vars(ours) == vars(theirs)
    assert ours.defects == theirs.defects == []
    assert ours.get_payload() == theirs.get_payload() == ""
    assert_same_message(ours, theirs)


@pytest.mark.parametrize("head", FALLBACK_HEADS)
def test_unusual_head_falls_back_to_the_feed_parser(head):
    assert wire.plain_fields(head_lines(head)) is None
    assert_same_message(wire.parse_headers(io.BytesIO(head)), stdlib_parse(head))


def test_repeated_field_keeps_every_value_in_order():
    # The relay copies Set-Cookie one by one: merging or reordering would change cookies.
    head = b"Set-Cookie: a=1\r\nX: y\r\nset-cookie: b=2\r\nSET-COOKIE: c=3\r\n\r\n"
    message = wire.parse_headers(io.BytesIO(head))
    assert message.get_all("Set-Cookie") == ["a=1", "b=2", "c=3"]
    assert message.items() == [("Set-Cookie", "a=1"), ("X", "y"), ("set-cookie", "b=2"), ("SET-COOKIE", "c=3")]


def test_parse_reads_exactly_the_head_and_leaves_the_body():
    # http.client reads the body from the same buffered file right after the head.
    fp = io.BytesIO(b"Content-Length: 4\r\nX-A: v\r\n\r\nbody\r\n\r\nmore")
    message = wire.parse_headers(fp)
    assert message.items() == [("Content-Length", "4"), ("X-A", "v")]
    assert fp.read() == b"body\r\n\r\nmore"


def test_other_message_class_goes_through_the_feed_parser():
    class Custom(http.client.HTTPMessage):
        pass

    head = b"X-A: v\r\n\r\n"
    ours = wire.parse_headers(io.BytesIO(head), _class=Custom)
    theirs = email.parser.Parser(_class=Custom).parsestr(head.decode("iso-8859-1"))
    assert type(ours) is Custom
    assert vars(ours) == vars(theirs)


# -- limits still apply --------------------------------------------------------------

def test_line_longer_than_maxline_is_refused():
    head = b"X-Long: " + b"v" * http.client._MAXLINE + b"\r\n\r\n"
    with pytest.raises(http.client.LineTooLong):
        wire.parse_headers(io.BytesIO(head))


def test_more_lines_than_maxheaders_is_refused():
    # _MAXHEADERS counts lines including the empty one: 100 fields make 101 lines.
    head = b"".join(b"X-%d: v\r\n" % i for i in range(http.client._MAXHEADERS)) + b"\r\n"
    with pytest.raises(http.client.HTTPException, match="more than"):
        wire.parse_headers(io.BytesIO(head))


# -- installed by patches.apply (the "plain_head_parser" patch) ------------------------

def test_installed_parser_serves_http_client_responses():
    # http.client looks parse_headers up as a module global when a response begins.
    a, b = socket.socketpair()
    try:
        a.settimeout(1)
        b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nhi")
        response = http.client.HTTPResponse(a)
        response.begin()
        assert response.status == 200
        assert response.msg.items() == [("Content-Length", "2"), ("X-A", "1"), ("x-a", "2")]
        assert response.msg.get_all("X-A") == ["1", "2"]
        assert response.read() == b"hi"
        response.close()
    finally:
        a.close()
        b.close()


# -- OneWriteHTTPConnection: a small body leaves with the head ------------------------

@pytest.fixture
def seqpacket():
    """(sender, receiver): SEQPACKET keeps sendall boundaries, one recv per write."""
    a, b = seqpacket_pair()
    a.settimeout(2)
    b.settimeout(1)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def send_request(sock, cls=wire.OneWriteHTTPConnection, host="upstream.test", port=80, **kwargs):
    conn = cls(host, port, timeout=2)
    conn.sock = sock  # an assigned socket makes http.client skip connect()
    conn.request(**kwargs)
    return conn


def test_small_body_goes_out_with_the_head_in_one_write(seqpacket):
    a, b = seqpacket
    conn = send_request(
        a,
        method="POST",
        url="/v1/x",
        body=b'{"a":1}',
        headers={"Content-Type": "application/json", "Content-Length": "7", "User-Agent": SKIP, "Accept-Encoding": SKIP},
    )
    assert b.recv(1 << 20) == (
        b"POST /v1/x HTTP/1.1\r\n"
        b"Host: upstream.test\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 7\r\n"
        b"\r\n"
        b'{"a":1}'
    )
    assert queued_messages(b) == []  # a non-blocking read finds no second write
    assert conn._body_with_head is None


ONE = wire.ONE_WRITE_MAX


def post_head(length: int, name: bytes = b"Content-Length") -> bytes:
    return b"POST /v1/x HTTP/1.1\r\nHost: upstream.test\r\nAccept-Encoding: identity\r\n%b: %d\r\n\r\n" % (name, length)


HEAD_7 = post_head(7)


class Generated(list):
    """Body parts that the test hands over as a fresh generator (a table value is reused)."""


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        P(
            dict(body=b"abcdefg", headers={"content-length": "7", "User-Agent": SKIP}),
            [post_head(7, b"content-length") + b"abcdefg"],
            id="lowercase-content-length-merges",
        ),
        P(
            dict(body=b"z" * ONE, headers={"Content-Length": str(ONE), "User-Agent": SKIP}),
            [post_head(ONE) + b"z" * ONE],
            id="body-of-one-write-max-merges",
        ),
        P(
            dict(body=b"z" * (ONE + 1), headers={"Content-Length": str(ONE + 1), "User-Agent": SKIP}),
            [post_head(ONE + 1), b"z" * (ONE + 1)],
            id="body-over-one-write-max-stays-separate",
        ),
        P(
            dict(body=b'{"a":1}', headers={"Content-Type": "application/json", "User-Agent": SKIP}, chunked=True),
            [
                (
                    b"POST /v1/x HTTP/1.1\r\nHost: upstream.test\r\nAccept-Encoding: identity\r\n"
                    b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                ),
                b'7\r\n{"a":1}\r\n',
                b"0\r\n\r\n",
            ],
            id="chunked-keeps-urllib3-framing",
        ),
        P(
            dict(body=Generated([b"ab", b"cde", b"fg"]), headers={"Content-Length": "7", "User-Agent": SKIP}),
            [HEAD_7, b"ab", b"cde", b"fg"],
            id="iterator-body-streams",
        ),
        P(
            dict(body=bytearray(b"abcdefg"), headers={"Content-Length": "7", "User-Agent": SKIP}),
            [HEAD_7, b"abcdefg"],
            id="bytearray-body-not-held",
        ),
        P(
            # Without the caller's Content-Length urllib3 computes it from the body itself;
            # holding the body back would make it announce Content-Length: 0.
            dict(body=b"abcdefg", headers={"User-Agent": SKIP}),
            [HEAD_7, b"abcdefg"],
            id="no-content-length-header-not-held",
        ),
        P(
            dict(body=b"", headers={"Content-Length": "0", "User-Agent": SKIP}),
            [post_head(0)],
            id="empty-body-head-only",
        ),
    ],
)
def test_request_bytes_and_writes(seqpacket, kwargs, expected):
    a, b = seqpacket
    if isinstance(kwargs["body"], Generated):
        kwargs = {**kwargs, "body": (part for part in kwargs["body"])}
    conn = send_request(a, method="POST", url="/v1/x", **kwargs)
    assert queued_messages(b) == expected
    assert conn._body_with_head is None


def test_get_without_body_is_one_write_and_leaves_nothing_held(seqpacket):
    a, b = seqpacket
    conn = send_request(a, method="GET", url="/v1/models?x=1", body=None, headers={"User-Agent": SKIP})
    assert queued_messages(b) == [b"GET /v1/models?x=1 HTTP/1.1\r\nHost: upstream.test\r\nAccept-Encoding: identity\r\n\r\n"]
    assert conn._body_with_head is None


def test_https_connection_class_merges_too(seqpacket):
    # Only the head+body merge is under test: the assigned socket skips the TLS handshake.
    a, b = seqpacket
    send_request(
        a,
        cls=wire.OneWriteHTTPSConnection,
        port=443,
        method="PUT",
        url="/x",
        body=b"hello",
        headers={"Content-Length": "5", "User-Agent": SKIP, "Accept-Encoding": SKIP},
    )
    assert queued_messages(b) == [b"PUT /x HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 5\r\n\r\nhello"]


def test_held_body_does_not_leak_into_the_next_request_on_the_connection(seqpacket):
    # A kept-alive upstream connection carries many requests: each body must go with its
    # own head only, and a GET after a POST must carry nothing.
    a, b = seqpacket
    conn = send_request(a, method="POST", url="/one", body=b"first", headers={"Content-Length": "5", "User-Agent": SKIP, "Accept-Encoding": SKIP})
    assert queued_messages(b) == [b"POST /one HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 5\r\n\r\nfirst"]
    b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: 1\r\n\r\nok")
    response = conn.getresponse()
    assert response.status == 200
    assert response.headers["X-Up"] == "1"
    assert response.data == b"ok"  # preloaded, as the pool does; the connection is idle again

    conn.request("GET", "/two", headers={"User-Agent": SKIP, "Accept-Encoding": SKIP})
    assert queued_messages(b) == [b"GET /two HTTP/1.1\r\nHost: upstream.test\r\n\r\n"]
    assert conn._body_with_head is None
