"""Two pieces of the upstream HTTP/1.1 exchange done with less work, bytes unchanged.

urllib3 drives http.client, which costs the proxy two things per request that change
nothing on the wire:

- A request with a body goes out in two writes, the head and then the body (urllib3's
  ``HTTPConnection.request`` sends body chunks after ``endheaders()``). On loopback or a
  LAN each ``sendall`` is a system call that runs the receiver's TCP input too, about
  10 us. :class:`OneWriteHTTPConnection` sends a small body with the head, in one write.
- Every response head goes through the ``email`` package's feed parser (built for mail:
  MIME, folding, defects), about 13 us for six plain header lines.
  :func:`parse_headers` builds the same ``HTTPMessage`` directly when every line is a
  plain ``name: value`` line, and hands anything else to the feed parser exactly as
  http.client does, so unusual heads get the standard parse, defects included.

Both are speed-only. The connection classes are chosen by the upstream adapter
(``upstream.ProxyAdapter``); the head parser is installed by ``patches.apply`` when the
worker starts, never on import.

One more piece is about correctness: :class:`CheckedHTTPResponse` refuses a response head
that http.client could only partly parse (urllib3 only logs that, and the rest of the
head would be relayed as body).
"""

from __future__ import annotations

import email.parser
import http.client
import re

from urllib3.connection import HTTPConnection
from urllib3.connection import HTTPSConnection
from urllib3.exceptions import HeaderParsingError
from urllib3.util.response import assert_header_parsing

# A body up to this size is sent in the head's write (larger ones stream in blocks).
ONE_WRITE_MAX = 64 * 1024

# name ":" OWS value, the value of visible ASCII, space and tab only. What the feed
# parser does with such a line (email.feedparser headerRE, Compat32.header_source_parse):
# the name as written, the value with leading space/tab and the line end removed.
_PLAIN_FIELD = re.compile(rb"([!-9;-~]+):[ \t]*([\t -~]*?)\r?\n")


def plain_fields(lines: list[bytes]) -> list[tuple[str, str]] | None:
    """The (name, value) fields of a head's lines, or None unless every line is plain.

    ``lines`` are the head's lines as http.client read them, the empty line last. Not
    plain: folded lines, bytes outside ASCII, a bare CR, a missing empty line, and a
    multipart or message Content-Type (the feed parser goes on to parse a body for those).
    """
    if not lines or lines[-1] not in (b"\r\n", b"\n"):
        return None
    fields = []
    for line in lines[:-1]:
        match = _PLAIN_FIELD.fullmatch(line)
        if match is None:
            return None
        name = match[1].decode("ascii")
        value = match[2].decode("ascii")
        if name.lower() == "content-type" and value.lower().startswith(("multipart", "message")):
            return None
        fields.append((name, value))
    return fields


def parse_headers(fp, _class=http.client.HTTPMessage):
    """http.client.parse_headers, without the feed parser for plain heads."""
    lines = http.client._read_headers(fp)
    fields = plain_fields(lines)
    if fields is None or _class is not http.client.HTTPMessage:
        return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
    message = _class()
    # What the feed parser leaves for a head with an empty body.
    message._headers = fields
    message._payload = ""
    return message


class _OneWrite:
    """Holds a small body back at ``request()`` and sends it with the head."""

    _body_with_head: bytes | None = None

    def request(self, method, url, body=None, headers=None, *, chunked=False, **kwargs):
        if (
            type(body) is bytes
            and 0 < len(body) <= ONE_WRITE_MAX
            and not chunked
            and headers is not None
            # Without it urllib3 would describe the held-back body as "Content-Length: 0".
            and any(name.lower() == "content-length" for name in headers)
        ):
            self._body_with_head = body
            body = None
        try:
            super().request(method, url, body, headers, chunked=chunked, **kwargs)
        finally:
            self._body_with_head = None

    def send(self, data):
        # The first send after request() is the head (http.client's endheaders).
        body = self._body_with_head
        if body is not None:
            self._body_with_head = None
            data = data + body
        super().send(data)


class UnparsableHead(http.client.HTTPException):
    """The upstream's response head could only partly be parsed: it is never relayed."""


class CheckedHTTPResponse(http.client.HTTPResponse):
    """http.client's response, refusing a head it could only partly parse.

    A malformed line ("Content-Length : 2") ends http.client's header parsing early, and
    the rest of the head would be read as body. urllib3 logs that and goes on; here it
    fails the exchange before anything is relayed (the caller gets a 502), and urllib3
    closes the connection, so it is never reused.
    """

    def begin(self):
        super().begin()
        try:
            assert_header_parsing(self.msg)
        except HeaderParsingError as exc:
            raise UnparsableHead(f"unparsable response head: {exc}") from None


# The connection classes the adapter's pools use (http.client's documented
# ``response_class`` hook), without and with the one-write request.
class UpstreamHTTPConnection(HTTPConnection):
    response_class = CheckedHTTPResponse


class UpstreamHTTPSConnection(HTTPSConnection):
    response_class = CheckedHTTPResponse


class OneWriteHTTPConnection(_OneWrite, UpstreamHTTPConnection):
    pass


class OneWriteHTTPSConnection(_OneWrite, UpstreamHTTPSConnection):
    pass
