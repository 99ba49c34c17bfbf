"""The caller's request body: framing rules, streaming readers, and settling what is unread.

The body is streamed to the upstream as it arrives, never held whole. Framing is
checked before anything is sent: Content-Length *or* ``Transfer-Encoding: chunked``,
never both, never another coding (RFC 9112 §6.1: the smuggling pair). A body that ends
early or breaks its chunked framing mid-stream raises :class:`BadRequestBody`, so the
upstream never sees it completed.
"""

from __future__ import annotations

import errno
import os
import socket
import time

# 64 KiB steps: large enough for throughput, small enough that memory stays flat.
CHUNK_SIZE = 64 * 1024
# The largest recv() gunicorn makes for a request body (its default: 1 MiB), set by the
# worker (patches.py, "body_recv_size").
MAX_BODY_RECV = 256 * 1024
# A Content-Length body is read from gunicorn in blocks of this size. gunicorn's reader
# receives a large piece at a time and, on every smaller read, copies what is left of it
# into a new buffer: reading 64 KiB at a time out of 1 MiB pieces copied each byte about a
# dozen times, and a 50 MiB upload took 0.19 s instead of 0.06 s (bench/stream_probe.py).
# Half a receive per read keeps the copies few.
UPLOAD_BLOCK = MAX_BODY_RECV // 2
# Bodies above this are refused with 413 (PROXY_MAX_BODY_BYTES; 0 turns the limit off).
MAX_BODY_BYTES = int(os.environ.get("PROXY_MAX_BODY_BYTES", str(1024**3)))
# A proxy-made error (401, 404, ...) reads and discards at most this much unread body so
# the connection stays usable; beyond it the connection is closed gracefully instead.
DRAIN_LIMIT = 8 * 1024 * 1024
LINGER_SECONDS = 2.0


class BadRequestBody(Exception):
    """The caller's body broke its framing or its announced length: never forward it as complete."""

    status = 400


class BodyTooLarge(BadRequestBody):
    status = 413


class LengthLimitedBody:
    """A file-like view of exactly ``length`` bytes of the WSGI input.

    urllib3 streams it in blocks; the caller's Content-Length header is sent as it is, and
    a short or broken body raises instead of ending early.
    """

    def __init__(self, stream, length: int):
        self._stream = stream
        self._remaining = length

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        if size is None or size < 0 or size > self._remaining:
            size = self._remaining
        try:
            data = self._stream.read(size)
        except Exception as exc:  # noqa: BLE001 - gunicorn's parser errors, a reset socket, a timeout
            raise BadRequestBody(f"request body unreadable: {type(exc).__name__}") from None
        if not data:
            raise BadRequestBody(f"request body ended {self._remaining} bytes short of its Content-Length")
        self._remaining -= len(data)
        return data

    def read_all(self) -> bytes:
        parts = []
        while data := self.read():
            parts.append(data)
        return b"".join(parts)


def chunked_body(stream, limit: int = MAX_BODY_BYTES, size: int = CHUNK_SIZE):
    """Yield a chunked (length-less) WSGI input as it arrives; urllib3 re-chunks it.

    gunicorn de-chunks and signals the end with b""; a malformed or truncated chunk raises
    inside its reader, which becomes BadRequestBody here so urllib3 never sends the final
    zero-length chunk.
    """
    total = 0
    while True:
        try:
            data = stream.read(size)
        except Exception as exc:  # noqa: BLE001 - gunicorn's chunk parser raises several kinds
            raise BadRequestBody(f"chunked request body invalid: {type(exc).__name__}") from None
        if not data:
            return
        total += len(data)
        if limit and total > limit:
            raise BodyTooLarge("chunked request body above the size limit")
        yield data


def request_body(environ, headers: list[tuple[str, str]]):
    """The body to stream upstream, adding the Content-Length header that describes it.

    Returns None for no body, a reader or a generator; raises BadRequestBody for invalid
    framing. A chunked upload is forwarded chunked (urllib3 adds Transfer-Encoding).
    """
    length = environ.get("CONTENT_LENGTH")
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    stream = environ["wsgi.input"]
    if coding is not None:
        # Both framings, or a coding other than plain "chunked" ("identity, chunked",
        # "xchunked"...), cannot be relayed as they came: refuse rather than guess.
        if length or coding.strip().lower() != "chunked" or not environ.get("wsgi.input_terminated"):
            raise BadRequestBody("invalid Transfer-Encoding framing")
        return chunked_body(stream)
    if not length:
        return None
    if not length.isdigit():
        raise BadRequestBody("invalid Content-Length")
    size = int(length)
    if MAX_BODY_BYTES and size > MAX_BODY_BYTES:
        raise BodyTooLarge("Content-Length above the size limit")
    headers.append(("Content-Length", length))
    if not size:
        return None
    if size <= CHUNK_SIZE:
        # One block: read it here and hand urllib3 bytes (no per-block reader calls);
        # memory stays within one streaming step either way.
        return LengthLimitedBody(stream, size).read_all()
    return LengthLimitedBody(stream, size)


def has_body(environ) -> bool:
    return bool(environ.get("CONTENT_LENGTH")) or "HTTP_TRANSFER_ENCODING" in environ


def drain(environ, limit: int = DRAIN_LIMIT) -> bool:
    """Read and discard what is left of the request body; False if more than ``limit`` remains.

    Answering without reading a large body, then closing, makes the kernel send RST, which
    can destroy the answer before the caller (or nginx) reads it.
    """
    stream = environ["wsgi.input"]
    remaining = limit
    try:
        while remaining > 0:
            data = stream.read(min(CHUNK_SIZE, remaining))
            if not data:
                return True
            remaining -= len(data)
    except Exception:  # noqa: BLE001 - an unreadable body is simply not drained
        return False
    return False


def close_after_response(environ, response) -> None:
    """Close the caller's connection once ``response`` is written, without a reset.

    Used when the rest of the request cannot be read safely (broken framing, too large):
    the connection must not be reused, since what follows on it, even bytes gunicorn has
    already buffered, is not a request. Under gunicorn, once the answer is written the
    socket is half-closed and briefly drained (a "lingering close", RFC 9112 §9.6, so the
    caller gets the whole answer, not a reset), then the body iterator raises
    ECONNRESET: gunicorn's way to drop a connection quietly, buffered bytes included.
    """
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return
    data = response.get_data()
    response.headers["Content-Length"] = str(len(data))
    response.response = _then_close(data, sock)


def _then_close(data: bytes, sock):
    yield data
    _linger(sock)
    raise ConnectionResetError(errno.ECONNRESET, "connection closed after an unusable request body")


def _linger(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(CHUNK_SIZE):
                break
    except OSError:
        pass
