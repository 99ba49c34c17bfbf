"""Measure one gunicorn worker while large bodies and an SSE stream pass through it.

    .venv/bin/python bench/stream_probe.py [--mib 50] [--events 20] [--interval 0.05]

Starts the production stack (deploy/gunicorn.conf.py, one worker) in front of the
recording upstream from tests/upstream.py, then reports:

- the worker's peak RSS growth (VmHWM after minus VmRSS before, the high-water mark reset
  through /proc/PID/clear_refs) during a streamed upload and a streamed download;
- for an SSE stream, the delay between the upstream writing each event and the caller
  reading it (same process, same monotonic clock).

Everything binds to 127.0.0.1 on ports the OS picks; every transfer is bounded in time.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gunicorn_proc import reset_peak
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import status_kib
from tests.gunicorn_proc import write_config
from tests.test_e2e import read_chunked_events
from tests.upstream import Upstream
from tests.upstream import big_download
from tests.upstream import sse
from tests.upstream import wait_sent


def upload(server, size: int, chunked: bool) -> float:
    block = bytes(range(256)) * 256
    conn = server.connection(timeout=120)
    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(size)
    started = time.monotonic()
    conn.request("POST", "/up", body=(block for _ in range(size // len(block))), headers=headers, encode_chunked=chunked)
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
    return time.monotonic() - started


def download(server, size: int) -> float:
    conn = server.connection(timeout=120)
    started = time.monotonic()
    conn.request("GET", "/down")
    response = conn.getresponse()
    digest = hashlib.sha256()
    while chunk := response.read(1 << 20):
        digest.update(chunk)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    events = [b'data: {"n":%d}\n\n' % i for i in range(args.events)]
    with Upstream() as upstream, tempfile.TemporaryDirectory() as tmp:
        upstream.route("/down", big_download(size))
        handler = upstream.route("/sse", sse(events, interval=args.interval))
        config = {
            "general_settings": {
                "pass_through_endpoints": [
                    {"path": p, "target": upstream.url + p} for p in ("/up", "/down", "/sse")
                ]
            }
        }
        with run_gunicorn(write_config(Path(tmp), config), {**__import__("os").environ}) as server:
            (worker,) = server.worker_pids()
            upload(server, 1 << 20, False)  # warm up: first request builds the Session and pool
            print(f"worker {worker} idle RSS: {status_kib(worker, 'VmRSS') / 1024:.1f} MiB")
            for name, run in (
                (f"upload {args.mib} MiB, Content-Length", lambda: upload(server, size, False)),
                (f"upload {args.mib} MiB, chunked", lambda: upload(server, size, True)),
                (f"download {args.mib} MiB", lambda: download(server, size)),
            ):
                before = reset_peak(worker)
                seconds = run()
                growth = status_kib(worker, "VmHWM") - before
                print(f"{name}: {seconds:.2f} s, worker peak RSS growth {growth / 1024:.2f} MiB")
            import socket

            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
                received = read_chunked_events(sock, len(events), time.monotonic() + 30)
            delays = [(at - sent) * 1000 for (_, at), sent in zip(received, wait_sent(handler, len(events)), strict=False)]
            print(
                f"SSE {len(delays)} events, {args.interval * 1000:.0f} ms apart: delay upstream write -> caller read "
                f"median {statistics.median(delays):.2f} ms, first {delays[0]:.2f} ms, max {max(delays):.2f} ms"
            )


if __name__ == "__main__":
    main()
