"""The gunicorn worker: gthread, hardened for callers that are slow, idle or malformed.

Two departures from gunicorn's ThreadWorker, both for SPEC §8 ("slow or vanished callers
never stop other callers from being served"; malformed requests get a 4xx):

- A new connection waits in the worker's poller until its first byte arrives, instead of
  holding a pool thread for up to 5 s (gunicorn 27 submits it to the pool at once and
  waits there). Idle connections cost a socket, not a thread; one that sends nothing for
  FIRST_BYTE_TIMEOUT is closed. When the worker's connection slots are full, the idle
  connection oldest in line is closed to make room (nginx does the same with idle
  keep-alive connections), so idle sockets cannot lock new callers out.
- An unsupported Transfer-Encoding is answered 400, not 501: RFC 9112 §6.1 allows 501,
  but to a proxy holding credentials ``xchunked`` or ``chunked;q=1`` is an obfuscation
  attempt, and SPEC §8 answers malformed requests with a 4xx (gunicorn closes after
  either).

A caller that trickles its request head byte by byte still holds a thread while it does:
behind nginx (deploy/nginx.conf) heads are read in full before gunicorn sees them.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from functools import partial

from gunicorn.http.errors import InvalidHeader
from gunicorn.http.errors import UnsupportedTransferCoding
from gunicorn.workers.gthread import TConn
from gunicorn.workers.gthread import ThreadWorker

FIRST_BYTE_TIMEOUT = 10.0
# Only connections idle at least this long are closed to make room.
MIN_IDLE_TO_EVICT = 0.5


def _has_data(sock) -> bool:
    """Whether bytes (or an EOF) wait on a non-blocking socket."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return False
    return True


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

    def handle_error(self, req, client, addr, exc):
        if isinstance(exc, UnsupportedTransferCoding):
            exc = InvalidHeader("Transfer-Encoding", req)
        super().handle_error(req, client, addr, exc)
