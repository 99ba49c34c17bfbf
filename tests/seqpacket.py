"""SOCK_SEQPACKET socket pairs, where the peer receives one message per write.

Tests of how many writes something makes read the messages queued on the peer.
"""

from __future__ import annotations

import socket


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def queued_messages(sock: socket.socket, limit: int = 50) -> list[bytes]:
    """Every message queued on sock, without waiting.

    The writer runs in the test's own thread, and a unix socket's sendall returns once the
    bytes are in the peer's queue: a non-blocking read sees every write made so far.
    """
    received = []
    timeout = sock.gettimeout()
    sock.settimeout(0)  # with a timeout set, Python polls first and MSG_DONTWAIT would wait
    try:
        for _ in range(limit):
            try:
                received.append(sock.recv(1 << 20))
            except BlockingIOError:
                return received
    finally:
        sock.settimeout(timeout)
    raise AssertionError(f"more than {limit} messages")
