"""A real HTTP/1.1 upstream server for tests, built on raw sockets.

Why raw sockets and not http.server: the proxy under test must be checked byte
for byte (header order, original case, duplicates, raw request-targets, chunk
timing, half-sent bodies), and http.server normalises or hides all of that.

Every request is recorded exactly as received, then answered by a per-path
handler ``handler(req: Recorded, w: Writer)``.  The default handler echoes a
JSON summary of the request.

Bounds: every blocking socket operation has a timeout (``timeout``, 10 s by
default), request heads are limited to 64 KiB, and at most 1 MiB of a request
body is kept in memory (the rest is only hashed and counted).
"""

from __future__ import annotations

import hashlib
import http
import json
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from dataclasses import field

DEFAULT_TIMEOUT = 10.0
MAX_HEAD = 64 * 1024
MAX_LINE = 8 * 1024  # chunk-size and trailer lines
MAX_TRAILERS = 100
KEEP_BODY_LIMIT = 1024 * 1024
RECV_SIZE = 65536
ACCEPT_POLL = 0.1  # listener timeout: how long stop() may wait for the accept thread
SLEEP_POLL = 0.05  # granularity of Writer.sleep's checks for stop / peer close
LINGER = 1.0  # how long to drain the peer after our FIN (see _Connection._linger)
STOP_JOIN = 1.5  # total bound for joining connection threads in stop()

_HEX = frozenset(b"0123456789abcdefABCDEF")

# 251 is prime, so the pattern never lines up with power-of-two buffer sizes:
# a dropped, duplicated or reordered block always changes the hash.
_PATTERN = bytes(range(251))


# --------------------------------------------------------------------------
# Deterministic payloads
# --------------------------------------------------------------------------


def _iter_pattern(n_bytes: int, chunk: int = 65536):
    """Yield the first n_bytes of the repeating pattern, chunk bytes at a time.

    One window of about chunk + 251 bytes is reused, so memory stays constant
    whatever n_bytes is.
    """
    period = len(_PATTERN)
    window = memoryview(_PATTERN * (chunk // period + 2))
    pos = 0
    while pos < n_bytes:
        size = min(chunk, n_bytes - pos)
        offset = pos % period
        yield window[offset : offset + size]
        pos += size


def pattern_bytes(n: int) -> bytes:
    """The first n bytes of the deterministic pattern (for small bodies)."""
    return (_PATTERN * (n // len(_PATTERN) + 1))[:n]


def pattern_sha256(n_bytes: int) -> str:
    """Hex sha256 of the first n_bytes of the pattern, computed by streaming."""
    digest = hashlib.sha256()
    for piece in _iter_pattern(n_bytes):
        digest.update(piece)
    return digest.hexdigest()


# --------------------------------------------------------------------------
# The record of one request
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One request exactly as the upstream received it."""

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: list  # list[tuple[str, str]]: order, case and duplicates kept
    body: bytes  # b"" when the body was larger than KEEP_BODY_LIMIT
    body_len: int
    sha256: str
    chunked: bool
    raw_head: bytes
    conn_id: int
    trailers: list = field(default_factory=list)  # chunked trailers, like headers

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def names(self) -> list[str]:
        return [key.lower() for key, _ in self.headers]


class _BadRequest(Exception):
    """The peer sent something we refuse; answered with `status`, then closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _PeerClosed(ConnectionError):
    """EOF in the middle of a request: the peer went away."""


# --------------------------------------------------------------------------
# Reading requests
# --------------------------------------------------------------------------


class _Reader:
    """Buffered reads over a socket.

    A buffer is needed because one recv() may carry the end of a request and
    the start of the next (pipelining / keep-alive).
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buf = bytearray()

    def _fill(self) -> None:
        data = self._sock.recv(RECV_SIZE)
        if not data:
            raise _PeerClosed("peer closed mid-request")
        self._buf += data

    def read_head(self) -> bytes | None:
        """Return the head up to and including CRLFCRLF.

        Returns None when the connection ends cleanly between requests (EOF
        or idle timeout with nothing buffered).
        """
        while True:
            # RFC 9112 2.2: a server should ignore empty lines before a request.
            while self._buf[:2] == b"\r\n":
                del self._buf[:2]
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                return self._take_head(end + 4)
            if len(self._buf) > MAX_HEAD:
                raise _BadRequest(431, "request head larger than 64 KiB")
            idle = not self._buf
            try:
                self._fill()
            except (_PeerClosed, TimeoutError):
                if idle:
                    return None
                raise

    def _take_head(self, size: int) -> bytes:
        if size > MAX_HEAD:
            raise _BadRequest(431, "request head larger than 64 KiB")
        head = bytes(self._buf[:size])
        del self._buf[:size]
        return head

    def read_line(self, limit: int) -> bytes:
        """Return one CRLF-terminated line without its CRLF."""
        while True:
            end = self._buf.find(b"\r\n")
            if 0 <= end <= limit:
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                return line
            if end > limit or len(self._buf) > limit + 2:
                raise _BadRequest(400, "line too long in body framing")
            self._fill()

    def read_some(self, max_n: int) -> bytes:
        if not self._buf:
            self._fill()
        data = bytes(self._buf[:max_n])
        del self._buf[:max_n]
        return data


class _BodySink:
    """Hashes and counts a body; keeps its bytes only while <= 1 MiB."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._kept: bytearray | None = bytearray()
        self.length = 0

    def feed(self, data: bytes) -> None:
        self._digest.update(data)
        self.length += len(data)
        if self._kept is None:
            return
        if self.length > KEEP_BODY_LIMIT:
            self._kept = None  # too big to keep: tests compare len + sha256
        else:
            self._kept += data

    @property
    def body(self) -> bytes:
        return bytes(self._kept) if self._kept is not None else b""

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _parse_head(raw_head: bytes):
    """Split a head into (method, target, version, headers); no normalisation."""
    # latin-1 maps every byte to one code point, so the text is lossless.
    lines = raw_head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts) or not parts[2].startswith("HTTP/"):
        raise _BadRequest(400, f"bad request line {lines[0]!r}")
    return parts[0], parts[1], parts[2], [_parse_field(line) for line in lines[1:]]


def _parse_field(line: str) -> tuple[str, str]:
    if line[:1] in (" ", "\t"):
        raise _BadRequest(400, f"obsolete line folding: {line!r}")
    name, colon, value = line.partition(":")
    if not colon or not name or name != name.strip():
        raise _BadRequest(400, f"bad header line {line!r}")
    return name, value.strip(" \t")


def _tokens(headers, name: str) -> list[str]:
    """Comma-separated, lower-cased tokens of every `name` header."""
    wanted = name.lower()
    return [
        token.strip().lower()
        for key, value in headers
        if key.lower() == wanted
        for token in value.split(",")
        if token.strip()
    ]


def _body_framing(headers) -> tuple[bool, int]:
    """Return (chunked, content_length) per RFC 9112 6.3."""
    codings = _tokens(headers, "transfer-encoding")
    if codings:
        # Transfer-Encoding wins over Content-Length; only chunked can end a body.
        if codings[-1] != "chunked":
            raise _BadRequest(400, f"unsupported transfer-encoding {codings}")
        return True, 0
    lengths = {value for key, value in headers if key.lower() == "content-length"}
    if not lengths:
        return False, 0
    value = lengths.pop()
    if lengths or not value.isdigit():
        raise _BadRequest(400, "invalid Content-Length")
    return False, int(value)


def _keep_alive(req: Recorded) -> bool:
    tokens = _tokens(req.headers, "connection")
    if "close" in tokens:
        return False
    if req.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return True


# --------------------------------------------------------------------------
# Writing responses
# --------------------------------------------------------------------------


def _enc(value) -> bytes:
    """Header text to bytes: bytes pass as-is, str goes through latin-1."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return str(value).encode("latin-1")


def _as_text(headers) -> list[tuple[str, str]]:
    return [(_enc(key).decode("latin-1"), _enc(value).decode("latin-1")) for key, value in headers]


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _has_header(headers, name: str) -> bool:
    wanted = name.lower()
    return any(key.lower() == wanted for key, _ in _as_text(headers))


def _may_have_body(status: int) -> bool:
    return not (100 <= status < 200 or status in (204, 304))


class Writer:
    """What a handler uses to answer; wraps the client socket."""

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.closed = False
        self.wants_close = False  # a response said "Connection: close"

    def send_raw(self, data: bytes) -> None:
        self._conn.sock.sendall(data)

    def _head(self, status: int, headers, reason) -> bytes:
        if "close" in _tokens(_as_text(headers), "connection"):
            self.wants_close = True  # the peer will not reuse the connection
        reason = _reason(status) if reason is None else reason
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _enc(reason))]
        lines += [_enc(key) + b": " + _enc(value) + b"\r\n" for key, value in headers]
        return b"".join(lines) + b"\r\n"

    def respond(self, status: int, headers=(), body: bytes = b"", reason=None) -> None:
        headers = list(headers)
        framed = _has_header(headers, "content-length") or _has_header(headers, "transfer-encoding")
        if not framed and _may_have_body(status):
            headers.append(("Content-Length", str(len(body))))
        # One sendall for head and body, so small responses leave in one segment.
        self.send_raw(self._head(status, headers, reason) + bytes(body))

    def start_chunked(self, status: int, headers=()) -> None:
        headers = list(headers)
        if not _has_header(headers, "transfer-encoding"):
            headers.append(("Transfer-Encoding", "chunked"))
        self.send_raw(self._head(status, headers, None))

    def chunk(self, data: bytes) -> None:
        # An empty chunk would be read as the terminating chunk: skip it.
        if data:
            self.send_raw(b"%x\r\n" % len(data) + bytes(data) + b"\r\n")

    def end_chunks(self) -> None:
        self.send_raw(b"0\r\n\r\n")

    def close(self) -> None:
        """Send FIN now and end the connection when the handler returns."""
        self.closed = True
        self._conn.shutdown_write()

    def sleep(self, seconds: float) -> bool:
        """Sleep; return False early if the server stops or the peer closes.

        Noticing the peer's close lets tests see (via connections_closed) that
        the proxy dropped an upstream connection while the handler was waiting.
        """
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if self._conn.server.stopping or self._conn.peer_gone(min(remaining, SLEEP_POLL)):
                return False


# --------------------------------------------------------------------------
# Ready-made handlers
# --------------------------------------------------------------------------


def echo_json():
    """Answer 200 with a compact JSON summary of the request (the default)."""

    def handler(req: Recorded, w: Writer) -> None:
        summary = {"method": req.method, "target": req.target, "body_len": req.body_len, "sha256": req.sha256}
        body = json.dumps(summary, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        w.respond(200, headers, b"" if req.method == "HEAD" else body)

    return handler


def fixed(status: int, headers=(), body: bytes = b"", reason=None):
    """Answer exactly this status, these headers (in order) and this body."""

    def handler(req: Recorded, w: Writer) -> None:
        w.respond(status, headers, body, reason)

    return handler


def sse(events, interval: float, status: int = 200, content_type=b"text/event-stream"):
    """Chunked response, one chunk per event, `interval` seconds apart.

    `handler.sent_at` lists the time.monotonic() just after each event was
    handed to the kernel; it is a new list on each call.
    """

    def handler(req: Recorded, w: Writer) -> None:
        sent_at = handler.sent_at = []
        w.start_chunked(status, [("Content-Type", content_type)])
        for index, event in enumerate(events):
            if index and not w.sleep(interval):
                w.close()
                return
            w.chunk(event)
            sent_at.append(time.monotonic())
        w.end_chunks()

    handler.sent_at = []
    return handler


def stall(seconds: float):
    """Read the request, then wait; answer 200 "late" if the wait completes."""

    def handler(req: Recorded, w: Writer) -> None:
        if w.sleep(seconds):
            w.respond(200, [("Content-Type", "text/plain")], b"late")
        else:
            w.close()

    return handler


def close_without_response():
    def handler(req: Recorded, w: Writer) -> None:
        w.close()

    return handler


def die_mid_body(head_len: int, sent: bytes):
    """Announce Content-Length: head_len, send only `sent`, then close."""

    def handler(req: Recorded, w: Writer) -> None:
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(head_len))]
        w.respond(200, headers, sent)
        w.close()

    return handler


def big_download(n_bytes: int, chunk: int = 65536, content_type="application/octet-stream"):
    """Content-Length response of n_bytes pattern bytes, generated on the fly."""

    def handler(req: Recorded, w: Writer) -> None:
        w.respond(200, [("Content-Type", content_type), ("Content-Length", str(n_bytes))])
        if req.method == "HEAD":
            return
        for piece in _iter_pattern(n_bytes, chunk):
            w.send_raw(piece)

    return handler


# --------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------


class _Connection:
    """Serves the requests of one accepted socket, in its own thread."""

    def __init__(self, server: Upstream, sock: socket.socket, conn_id: int):
        self.server = server
        self.sock = sock
        self.conn_id = conn_id
        self._reader = _Reader(sock)

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a thread must never print
            self.server._note_exception(self.conn_id, exc)
        finally:
            self._finish()

    def _serve(self) -> None:
        while not self.server.stopping:
            try:
                req = self._read_request()
            except _BadRequest as exc:
                self._reject(exc)
                return
            if req is None:
                return
            # Record first: a handler that stalls or dies still leaves a trace.
            self.server._record(req)
            writer = Writer(self)
            self.server._handler_for(req.path)(req, writer)
            if writer.closed or writer.wants_close or not _keep_alive(req):
                return

    def _read_request(self) -> Recorded | None:
        raw_head = self._reader.read_head()
        if raw_head is None:
            return None
        method, target, version, headers = _parse_head(raw_head)
        chunked, length = _body_framing(headers)
        if "100-continue" in _tokens(headers, "expect") and (chunked or length):
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        sink = _BodySink()
        trailers = self._read_chunked(sink) if chunked else self._read_exact(sink, length)
        path, _, query = target.partition("?")
        return Recorded(
            method=method, target=target, path=path, query=query, version=version,
            headers=headers, body=sink.body, body_len=sink.length, sha256=sink.sha256,
            chunked=chunked, raw_head=raw_head, conn_id=self.conn_id, trailers=trailers,
        )  # fmt: skip

    def _read_exact(self, sink: _BodySink, length: int) -> list:
        remaining = length
        while remaining:
            data = self._reader.read_some(min(remaining, RECV_SIZE))
            sink.feed(data)
            remaining -= len(data)
        return []

    def _read_chunked(self, sink: _BodySink) -> list:
        while True:
            size = self._chunk_size(self._reader.read_line(MAX_LINE))
            if size == 0:
                return self._read_trailers()
            self._read_exact(sink, size)
            if self._reader.read_line(0) != b"":
                raise _BadRequest(400, "missing CRLF after chunk data")

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        text = line.split(b";", 1)[0].strip(b" \t")  # extensions are ignored
        # int(x, 16) alone would also accept "0x10", "+5" or "1_0".
        if not text or not set(text) <= _HEX:
            raise _BadRequest(400, f"bad chunk size line {line!r}")
        return int(text, 16)

    def _read_trailers(self) -> list:
        trailers = []
        while line := self._reader.read_line(MAX_LINE):
            if len(trailers) >= MAX_TRAILERS:
                raise _BadRequest(400, "too many trailer fields")
            trailers.append(_parse_field(line.decode("latin-1")))
        return trailers

    def _reject(self, exc: _BadRequest) -> None:
        self.server._note_error(f"conn {self.conn_id}: rejected with {exc.status}: {exc}")
        head = b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % (exc.status, _reason(exc.status).encode())
        try:
            self.sock.sendall(head)
        except OSError:
            pass  # the peer may already be gone; the rejection is recorded anyway

    def peer_gone(self, wait: float) -> bool:
        """Wait up to `wait` s; True if the peer closed (EOF/reset) meanwhile."""
        try:
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable and self.sock.recv(1, socket.MSG_PEEK) == b"":
                return True
        except (OSError, ValueError):
            return True
        if readable:
            # Bytes of a next (pipelined) request are waiting, not a close;
            # wait here so that select() does not spin.
            self.server._stop_event.wait(wait)
        return False

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already closed by the peer or by stop()

    def _finish(self) -> None:
        if not self.server.stopping:
            self._linger()
        self.sock.close()
        self.server._connection_ended(self.sock)

    def _linger(self) -> None:
        """Send FIN, then drain what the peer still sends, briefly.

        Closing a socket with unread input makes the kernel send RST, which
        can destroy a response the peer has not read yet (e.g. our 431).
        """
        self.shutdown_write()
        deadline = time.monotonic() + LINGER
        try:
            self.sock.settimeout(SLEEP_POLL)
            while time.monotonic() < deadline and not self.server.stopping:
                try:
                    if not self.sock.recv(RECV_SIZE):
                        return
                except TimeoutError:
                    continue
        except OSError:
            return


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class Upstream:
    """A scripted HTTP/1.1 server on 127.0.0.1, port chosen by the OS."""

    def __init__(self, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT, tls=None):
        self.host = host
        self.timeout = timeout
        # An ssl.SSLContext (server side): every accepted connection speaks TLS.
        self.tls = tls
        self.port = 0
        self.url: str | None = None
        self.requests: list[Recorded] = []
        self.errors: list[str] = []  # unexpected exceptions and rejected requests
        self.disconnects: list[str] = []  # peers that went away mid-exchange
        self.connections_opened = 0
        self.connections_closed = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._routes: dict = {}
        self._prefixes: dict = {}
        self._default = echo_json()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._socks: set = set()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Upstream:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, 0))
        listener.listen(128)
        # A short accept timeout lets the accept loop notice stop() promptly.
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"upstream-accept-{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        if self._stop_event.is_set():
            return
        self._stop_event.set()
        if self._listener is not None:
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(ACCEPT_POLL * 5)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        # shutdown() (unlike close()) wakes a thread blocked in recv() on Linux.
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_JOIN
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            leftovers = list(self._socks)
        for sock in leftovers:  # a handler stuck outside Writer.sleep
            sock.close()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- routing -----------------------------------------------------------

    def route(self, path: str, handler):
        """Handle requests whose path (target before "?") is exactly `path`."""
        with self._lock:
            self._routes[path] = handler
        return handler

    def route_prefix(self, prefix: str, handler):
        """Handle paths starting with `prefix`; the longest prefix wins."""
        with self._lock:
            self._prefixes[prefix] = handler
        return handler

    def _handler_for(self, path: str):
        with self._lock:
            if path in self._routes:
                return self._routes[path]
            matches = [prefix for prefix in self._prefixes if path.startswith(prefix)]
            return self._prefixes[max(matches, key=len)] if matches else self._default

    # -- observation -------------------------------------------------------

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= n, timeout):
                seen = [f"{r.method} {r.target}" for r in self.requests]
                raise AssertionError(f"expected >= {n} requests within {timeout}s, got {len(seen)}: {seen}; errors: {self.errors}")
            return list(self.requests)

    def open_connections(self) -> int:
        with self._lock:
            return self.connections_opened - self.connections_closed

    def wait_connections_closed(self, expected_open: int = 0, timeout: float = 5.0) -> bool:
        """Wait until exactly `expected_open` connections are open."""
        with self._changed:
            return self._changed.wait_for(lambda: self.connections_opened - self.connections_closed == expected_open, timeout)

    # -- internals used by the threads -----------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed by stop()
            self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        sock.settimeout(self.timeout)
        # Each chunk must leave at once so tests can measure streaming delays.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # The handshake happens on the first read, in the connection's own thread.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._changed:
            if self.stopping:
                sock.close()
                return
            self.connections_opened += 1
            conn_id = self.connections_opened
            self._socks.add(sock)
            conn = _Connection(self, sock, conn_id)
            thread = threading.Thread(target=conn.run, name=f"upstream-conn-{conn_id}", daemon=True)
            self._threads.append(thread)
            self._changed.notify_all()
        thread.start()

    def _record(self, req: Recorded) -> None:
        with self._changed:
            self.requests.append(req)
            self._changed.notify_all()

    def _connection_ended(self, sock: socket.socket) -> None:
        with self._changed:
            if sock in self._socks:
                self._socks.discard(sock)
                self.connections_closed += 1
                self._changed.notify_all()

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _note_exception(self, conn_id: int, exc: BaseException) -> None:
        if self.stopping:
            return  # stop() tore the sockets down: failures then are expected
        if isinstance(exc, ConnectionError):
            with self._lock:
                self.disconnects.append(f"conn {conn_id}: {type(exc).__name__}: {exc}")
            return
        text = "".join(traceback.format_exception(exc))
        self._note_error(f"conn {conn_id}: {text}")


def wait_sent(handler, count: int, timeout: float = 5.0) -> list[float]:
    """The handler's ``sent_at`` once it holds ``count`` stamps.

    A stamp is taken just after a write returns, so the caller may read the last event
    a moment before its stamp exists.
    """
    deadline = time.monotonic() + timeout
    while len(handler.sent_at) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(handler.sent_at) >= count, handler.sent_at
    return handler.sent_at

