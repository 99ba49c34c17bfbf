"""The gunicorn worker: gthread, hardened for callers that are slow, idle or malformed.

Two departures from gunicorn's ThreadWorker so that slow or vanished callers never stop
other callers from being served and malformed requests get a 4xx, and three for speed and
memory (keep-alive linger, the head written with the first body bytes, smaller body
receives; see ProxyThreadWorker.handle, OneWriteResponse and patches.py; all three are off
with ``PROXY_SPEEDUPS=0``):

- A new connection waits in the worker's poller until its first byte arrives, instead of
  holding a pool thread for up to 5 s (gunicorn 27 submits it to the pool at once and
  waits there). Idle connections cost a socket, not a thread; one that sends nothing for
  FIRST_BYTE_TIMEOUT is closed. When the worker's connection slots are full, the idle
  connection oldest in line is closed to make room (nginx does the same with idle
  keep-alive connections), so idle sockets cannot lock new callers out.
- An unsupported Transfer-Encoding is answered 400, not 501: RFC 9112 §6.1 allows 501,
  but to a proxy holding credentials ``xchunked`` or ``chunked;q=1`` is an obfuscation
  attempt, and the proxy answers malformed requests with a 4xx (gunicorn closes after
  either).

A caller that trickles its request head byte by byte still holds a thread while it does:
behind nginx (deploy/nginx.conf) heads are read in full before gunicorn sees them.
"""

from __future__ import annotations

import errno
import io
import select
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.errors import InvalidHeader
from gunicorn.http.errors import UnsupportedTransferCoding
from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker

from proxy_app import patches

FIRST_BYTE_TIMEOUT = 10.0
# Only connections idle at least this long are closed to make room.
MIN_IDLE_TO_EVICT = 0.5
# How long a thread that has just answered waits on the same connection for its next
# request while few threads are busy (milliseconds; see ProxyThreadWorker.handle).
KEEPALIVE_LINGER_MS = 2


def _has_data(sock) -> bool:
    """Whether bytes (or an EOF) wait on a non-blocking socket."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False
    return True


class OneWriteResponse(wsgi.Response):
    """gunicorn's HTTP/1 response, writing its head together with the first body bytes.

    gunicorn writes the head and each body chunk with separate ``sendall`` calls; a small
    relayed answer took two system calls (and two GIL releases) where one does. The head
    is held from ``send_headers`` to the first body write, or to ``close`` when no body
    follows; ``sendfile`` writes around the head, so it is sent at once there.

    ``headers_sent`` stays False while the head is only held: if the app fails before
    anything was written, gunicorn still answers 500 instead of dropping the connection.
    """

    _held_head = None
    _hold = True

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            self._held_head = None  # PEP 3333: an error may replace a head not yet sent
        return super().start_response(status, headers, exc_info)

    def send_headers(self):
        if not self._hold:
            self._write_held_head()
            return super().send_headers()
        if self.headers_sent or self._held_head is not None:
            return
        # As gunicorn's send_headers, minus the write.
        tosend = self.default_headers()
        tosend.extend(["%s: %s\r\n" % (k, v) for k, v in self.headers])  # noqa: UP031 - gunicorn's formatting
        self._held_head = util.to_bytestring("%s\r\n" % "".join(tosend), "latin-1")  # noqa: UP031

    def _emit_body(self, data):
        head = self._held_head
        if head is None:
            return super()._emit_body(data)
        self._held_head = None
        if self.chunked:
            data = b"%X\r\n%b\r\n" % (len(data), data)  # util.write_chunk's framing
        self.sock.sendall(head + data)
        self.headers_sent = True

    def _write_held_head(self):
        head = self._held_head
        if head is not None:
            self._held_head = None
            util.write(self.sock, head)
            self.headers_sent = True

    def sendfile(self, respiter):
        self._hold = False
        return super().sendfile(respiter)

    def close(self):
        self.send_headers()
        self._write_held_head()
        super().close()


class ProxyThreadWorker(ThreadWorker):
    @property
    def _first_byte_timeout(self) -> float:
        return min(FIRST_BYTE_TIMEOUT, self.cfg.keepalive or FIRST_BYTE_TIMEOUT)

    def accept(self, listener):
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())  # non-blocking
        conn.timeout = time.monotonic() + self._first_byte_timeout
        self.pending_conns.append(conn)
        self.poller.register(client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
        self._make_room()

    def murder_pending(self):
        # Runs on every turn of the worker's loop (at least once a second): also the place
        # to free a slot while accepting is paused because all slots are taken.
        super().murder_pending()
        self._make_room()

    def _make_room(self) -> None:
        """Keep a slot free while idle connections hold the others.

        Only a connection with nothing to read is idle: one whose request has arrived but
        is not dispatched yet is never dropped.
        """
        if self.nr_conns < self.worker_connections:
            return
        now = time.monotonic()
        for queue, lifetime in ((self.keepalived_conns, self.cfg.keepalive), (self.pending_conns, self._first_byte_timeout)):
            for conn in list(queue):
                if self.nr_conns < self.worker_connections:
                    return
                # Idle for a while, not just accepted or just answered: a caller sends its
                # request right after connecting, and may be doing so at this moment.
                idle_since = conn.timeout - lifetime
                if now - idle_since < MIN_IDLE_TO_EVICT or _has_data(conn.sock):
                    continue
                queue.remove(conn)
                try:
                    self.poller.unregister(conn.sock)
                except (OSError, KeyError, ValueError):
                    pass
                self.nr_conns -= 1
                conn.close()

    def init_process(self):
        # Library patches are applied here, in the worker process, never on import
        # (patches.py); a library that lost what a patch replaces stops the worker here,
        # with a message naming it.
        patches.apply()
        state = patches.applied()
        self.log.info(
            "library patches in place: %s; not applied: %s",
            ", ".join(name for name, on in state.items() if on) or "none",
            ", ".join(name for name, on in state.items() if not on) or "none",
        )
        # The keep-alive linger (handle) is speed-only too.
        self._linger = patches.speedups_enabled()
        # Threads serving a connection now; see handle.
        self._busy = 0
        self._busy_lock = threading.Lock()
        super().init_process()

    def handle(self, conn):
        """Serve requests on one connection while they follow each other closely.

        gunicorn hands a kept-alive connection back to the main thread after every answer:
        a pool callback, a pipe write, an epoll registration, and for the next request an
        epoll event, an unregistration and a new task for the pool. A caller that sends its
        next request at once (a closed-loop client, nginx's upstream keep-alive pool) pays
        that on every request: at concurrency 1, a constant answer cost gunicorn's worker
        142 us of CPU and this one 100 us (bench/floor_apps.py). So while at most a quarter
        of the threads are busy, the thread that answered waits up to KEEPALIVE_LINGER_MS
        for the next request on that connection itself. Past that, connections go back to
        the poller after each answer, as in gunicorn, so that every connection gets its
        turn: when the threads are all busy and the GIL is contended, the main thread sees
        ready connections late, and threads serving their own connection in a loop made
        p99 latency at concurrency 64 three times worse.
        """
        with self._busy_lock:
            self._busy += 1
        try:
            keep = super().handle(conn)
            while keep is True and self.alive and self._next_request_soon(conn):
                keep = super().handle(conn)
            return keep
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _next_request_soon(self, conn) -> bool:
        if conn.is_http2:
            return False
        if conn.parser.unreader.buf.seek(0, io.SEEK_END):
            return True  # read ahead with the previous request's body
        if not self._linger or self._busy * 4 > self.cfg.threads:
            return False
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        return bool(poller.poll(KEEPALIVE_LINGER_MS))

    def handle_error(self, req, client, addr, exc):
        if isinstance(exc, UnsupportedTransferCoding):
            exc = InvalidHeader("Transfer-Encoding", req)
        super().handle_error(req, client, addr, exc)
