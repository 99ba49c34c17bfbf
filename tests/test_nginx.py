"""The production stack behind nginx: Debian's nginx with deploy/nginx.conf, in front of the
real gunicorn (deploy/gunicorn.conf.py), in front of a recording upstream.

The site file is used as shipped, except for two substitutions: its ``listen 80;`` becomes
a free loopback port and its ``server 127.0.0.1:4000;`` becomes the test gunicorn's port. It
is wrapped in a minimal main config whose pid, logs and temp paths all live in tmp_path.

Without nginx on the machine these tests are skipped, except under CI (the ``CI``
environment variable is set), where nginx is installed and a missing one is a failure.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import write_config
from tests.test_e2e import read_chunked_events
from tests.upstream import fixed
from tests.upstream import sse
from tests.upstream import wait_sent

SITE = ROOT / "deploy" / "nginx.conf"
LISTEN = "listen 80;"
UPSTREAM_SERVER = "server 127.0.0.1:4000;"
START_TIMEOUT = 15.0
FIFTY_MIB = 50 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB


# --------------------------------------------------------------------------
# Running nginx
# --------------------------------------------------------------------------


def find_nginx() -> str | None:
    # Debian installs nginx in /usr/sbin, which is not on a non-root user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


@pytest.fixture
def nginx_bin() -> str:
    path = find_nginx()
    if path is None:
        reason = "nginx not found on PATH or in /usr/sbin (Debian: apt-get install nginx-light)"
        if "CI" in os.environ:
            pytest.fail(f"{reason}; CI must install it", pytrace=False)
        pytest.skip(reason)
    return path


class Nginx:
    def __init__(self, proc: subprocess.Popen, port: int, prefix: Path):
        self.proc = proc
        self.port = port
        self.prefix = prefix

    def log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(f"--- nginx {name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def site_config(listen_port: int, gunicorn_port: int) -> str:
    """deploy/nginx.conf with the two test substitutions, each required exactly once."""
    text = SITE.read_text()
    assert text.count(LISTEN) == 1, f"{SITE} must contain {LISTEN!r} exactly once"
    assert text.count(UPSTREAM_SERVER) == 1, f"{SITE} must contain {UPSTREAM_SERVER!r} exactly once"
    text = text.replace(LISTEN, f"listen 127.0.0.1:{listen_port};")
    return text.replace(UPSTREAM_SERVER, f"server 127.0.0.1:{gunicorn_port};")


def main_config(prefix: Path, site: Path) -> str:
    # As root, nginx would run its worker as "nobody", which cannot enter pytest's 0700
    # tmp directory; run it as the invoking user instead (the directive needs root).
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp_paths = "".join(
        f"    {name}_temp_path {prefix / (name + '_temp')};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}"
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events {}\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        # An http {} default the site must override: Debian's nginx.conf has `gzip on;`, and
        # a gzip_types list often names JSON or event streams.
        "    gzip on;\n"
        "    gzip_types *;\n"
        f"{temp_paths}"
        f"    include {site};\n"
        "}\n"
    )


@contextmanager
def run_nginx(nginx: str, directory: Path, gunicorn_port: int):
    """Start nginx with the site in front of gunicorn_port; yield once it answers."""
    prefix = directory / "nginx"
    prefix.mkdir()
    for attempt in range(3):
        # The port is free now; another process could take it before nginx binds it, so an
        # "Address already in use" start is retried with a new port.
        port = free_port()
        site = prefix / "site.conf"
        site.write_text(site_config(port, gunicorn_port))
        conf = prefix / "main.conf"
        conf.write_text(main_config(prefix, site))
        with open(prefix / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen(
                [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Nginx(proc, port, prefix)
        try:
            if _wait_ready(server):
                break
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        if attempt == 2 or "Address already in use" not in server.log():
            raise AssertionError(f"nginx exited {proc.returncode}:\n{server.log()}")
    try:
        yield server
    finally:
        _stop(proc)


def _wait_ready(server: Nginx) -> bool:
    """True once nginx answers 200 for the proxy's readiness; False if nginx exited."""
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            conn = server.connection(timeout=2)
            conn.request("GET", "/health/readiness")
            response = conn.getresponse()
            last = (response.status, response.read())
            conn.close()
            if response.status == 200:
                return True
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"nginx not answering 200 after {START_TIMEOUT}s (last: {last!r}):\n{server.log()}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the nginx master by its PID: graceful (QUIT), then fast (TERM), then KILL."""
    for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------
# The stack: upstream <- gunicorn <- nginx
# --------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path, upstream, proxy_env, nginx_bin):
    config = {
        "general_settings": {
            "pass_through_endpoints": [
                {"path": "/s", "target": upstream.url + "/stream"},
                {"path": "/up", "target": upstream.url + "/up"},
            ]
        }
    }
    with run_gunicorn(write_config(tmp_path, config), proxy_env) as gunicorn:
        with run_nginx(nginx_bin, tmp_path, gunicorn.port) as nginx:
            yield gunicorn, nginx


class Tap:
    """A socket whose received bytes are also kept, to see the head read_chunked_events skips."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = bytearray()

    def recv(self, size: int) -> bytes:
        data = self.sock.recv(size)
        self.received += data
        return data


def early_answer(conn: http.client.HTTPConnection) -> str:
    """What the server already answered to a request still being sent, for a failure message."""
    try:
        conn.sock.settimeout(1)
        response = conn.getresponse()
        return f"it answered {response.status} {response.read(200)!r}"
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer: {type(exc).__name__}"


def head_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_site_file_passes_nginx_t(tmp_path, nginx_bin):
    # `nginx -t` binds the listen addresses too: port 80 needs root and may be taken (by a
    # system nginx), so only the listen line is replaced; the rest is tested as shipped.
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    site = prefix / "site.conf"
    site.write_text(site_config(free_port(), 4000))
    conf = prefix / "main.conf"
    conf.write_text(main_config(prefix, site))
    done = subprocess.run(
        [nginx_bin, "-t", "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[warn]" not in done.stderr and "[emerg]" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("content_type", "events"),
    [
        (b"text/event-stream", [b'data: {"n":%d}\n\n' % i for i in range(4)]),
        # proxy_app sends no X-Accel-Buffering for this content type.
        (b"application/x-ndjson", [b'{"n":%d}\n' % i for i in range(4)]),
    ],
    ids=["sse", "ndjson"],
)
def test_stream_reaches_caller_event_by_event_through_nginx(upstream, stack, content_type, events):
    gunicorn, nginx = stack
    handler = upstream.route("/stream", sse(events, interval=0.4, content_type=content_type))
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as sock:
        # Accept-Encoding: gzip: with the main config's `gzip on`, only the site's `gzip off`
        # keeps nginx from compressing the stream (and holding it back to fill gzip buffers).
        sock.sendall(
            b"POST /s HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        tap = Tap(sock)
        received = read_chunked_events(tap, len(events), time.monotonic() + 10)
    assert [data for data, _ in received] == events, nginx.log()
    sent_at = wait_sent(handler, len(events))
    for index in range(len(events) - 1):
        # The caller read event i before the upstream even wrote event i+1: nothing held it.
        assert received[index][1] < sent_at[index + 1], index

    head = head_lines(bytes(tap.received))
    assert head[0].startswith(b"http/1.1 200"), head
    assert any(line.startswith(b"x-litellm-call-id:") for line in head), head  # proxy_app answered
    assert not any(line.startswith(b"x-accel-buffering:") for line in head), head  # nginx hid it

    if content_type == b"text/event-stream":
        # ...while proxy_app itself does send it: nginx consumed it, it was not simply absent.
        conn = gunicorn.connection(timeout=10)
        conn.request("POST", "/s", body=b"{}", headers={"Content-Type": "application/json"})
        direct = conn.getresponse()
        assert direct.getheader("X-Accel-Buffering") == "no"
        assert direct.read() == b"".join(events)
        conn.close()


def paced_content_length(pieces: list[bytes], interval: float):
    """Upstream handler: a Content-Length response whose body is written piece by piece.

    ``handler.sent_at`` lists the time.monotonic() just after each piece was sent.
    """

    def handler(req, w) -> None:
        sent_at = handler.sent_at = []
        w.respond(200, [("Content-Type", "application/x-ndjson"), ("Content-Length", str(sum(map(len, pieces))))])
        for index, piece in enumerate(pieces):
            if index and not w.sleep(interval):
                w.close()
                return
            w.send_raw(piece)
            sent_at.append(time.monotonic())

    handler.sent_at = []
    return handler


def test_content_length_body_is_relayed_as_it_arrives_through_nginx(upstream, stack):
    # Not chunked, so nginx cannot see event boundaries: with proxy_buffering on, nginx 1.22
    # holds such a body until its buffer fills or the body ends (chunked responses happen to
    # flow either way). This is what the site's `proxy_buffering off` is checked by.
    gunicorn, nginx = stack
    pieces = [b'{"n":%d}\n' % i for i in range(4)]
    handler = upstream.route("/stream", paced_content_length(pieces, interval=0.4))
    arrived = []
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as sock:
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, body = buffer.split(b"\r\n\r\n", 1)
        assert b"content-length: %d" % sum(map(len, pieces)) in head.lower(), head
        boundaries = [sum(map(len, pieces[: i + 1])) for i in range(len(pieces))]
        deadline = time.monotonic() + 10
        while len(arrived) < len(pieces) and time.monotonic() < deadline:
            while len(arrived) < len(pieces) and len(body) >= boundaries[len(arrived)]:
                arrived.append(time.monotonic())
            if len(arrived) < len(pieces):
                body += sock.recv(65536)
    assert body == b"".join(pieces), nginx.log()
    sent_at = wait_sent(handler, len(pieces))
    for index in range(len(pieces) - 1):
        assert arrived[index] < sent_at[index + 1], index


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_fifty_mib_upload_streams_through_nginx(upstream, stack, chunked):
    gunicorn, nginx = stack
    blocks = (BLOCK for _ in range(FIFTY_MIB // len(BLOCK)))
    expected = hashlib.sha256(BLOCK * (FIFTY_MIB // len(BLOCK))).hexdigest()
    first_part = 16  # blocks (1 MiB) sent before checking that the request already moved on
    opened_before = upstream.connections_opened

    conn = nginx.connection(timeout=60)
    conn.putrequest("POST", "/up", skip_accept_encoding=True)
    conn.putheader("Content-Type", "application/octet-stream")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(FIFTY_MIB))
    conn.endheaders()
    for index, block in enumerate(blocks):
        conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if index + 1 == first_part:
            # 49 MiB are still unsent. A buffering nginx would wait for all of them before
            # even connecting to gunicorn; streaming, gunicorn already has the request head
            # and proxy_app has opened the upstream request.
            deadline = time.monotonic() + 10
            while upstream.connections_opened == opened_before and time.monotonic() < deadline:
                time.sleep(0.02)
            if upstream.connections_opened == opened_before:
                pytest.fail(
                    "the upstream saw no connection while the caller was still sending: nginx "
                    f"buffered the request body or refused it ({early_answer(conn)})\n{nginx.log()}"
                )
            assert upstream.requests == []  # and it has not seen the whole request yet
    if chunked:
        conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    body = response.read()
    conn.close()

    assert response.status == 200, (body, nginx.log())
    assert json.loads(body) == {"method": "POST", "target": "/up", "body_len": FIFTY_MIB, "sha256": expected}
    seen = upstream.wait_for_requests(1)[0]
    assert (seen.body_len, seen.sha256, seen.chunked) == (FIFTY_MIB, expected, chunked)
    if chunked:
        assert seen.header("content-length") is None
    else:
        assert seen.header("content-length") == str(FIFTY_MIB)


def test_health_endpoints_answer_through_nginx(stack):
    gunicorn, nginx = stack
    conn = nginx.connection(timeout=10)  # one keep-alive connection for all three
    answers = {}
    for path in ("/health/liveliness", "/health/liveness", "/health/readiness"):
        conn.request("GET", path)
        response = conn.getresponse()
        answers[path] = (response.status, response.read())
    conn.close()
    assert answers["/health/liveliness"] == (200, b'"I\'m alive!"')
    assert answers["/health/liveness"] == (200, b'"I\'m alive!"')
    status, body = answers["/health/readiness"]
    assert status == 200 and json.loads(body)["status"] == "healthy"


def test_metrics_only_from_localhost(stack):
    gunicorn, nginx = stack

    def get(path: str, source: str) -> tuple[int, bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            try:
                sock.bind((source, 0))
            except OSError as exc:
                pytest.skip(f"cannot use {source} as a source address: {exc}")
            sock.connect(("127.0.0.1", nginx.port))
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        return int(raw.split(b" ", 2)[1]), raw

    # 127.0.0.2 is loopback too, but not the 127.0.0.1 the site allows: nginx's $remote_addr
    # is the real peer, so this stands for any other client.
    for path in ("/metrics", "/metrics/", "/metrics?x=1", "/%6detrics", "/x/../metrics"):
        status, raw = get(path, "127.0.0.2")
        assert status == 403 and b"nginx" in raw, (path, raw)
    # From 127.0.0.1 the request reaches proxy_app (which may or may not serve /metrics).
    status, raw = get("/metrics", "127.0.0.1")
    assert status != 403 and status < 500, raw


def trickle_head(port: int, seconds: float, errors: list) -> None:
    """A slowloris caller: its request head arrives one byte every 0.2 s."""
    head = b"GET /s HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * int(seconds / 0.2) + b"\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for index in range(len(head)):
                sock.sendall(head[index : index + 1])
                if head[index : index + 1] == b"a":
                    time.sleep(0.2)
            sock.recv(65536)
    except OSError as exc:
        errors.append(exc)


def test_more_slow_header_callers_than_threads_do_not_stop_others(tmp_path, upstream, proxy_env, nginx_bin):
    # gthread gives a connection a thread at its first byte, so directly against gunicorn
    # more trickling callers than threads would hold every thread. nginx reads a head in
    # full before it connects upstream: through the site, gunicorn never sees them.
    upstream.route("/stream", fixed(200, [("Content-Type", "text/plain")], b"ok"))
    config = {"general_settings": {"pass_through_endpoints": [{"path": "/s", "target": upstream.url + "/stream"}]}}
    with run_gunicorn(write_config(tmp_path, config), proxy_env, threads=2) as gunicorn:
        with run_nginx(nginx_bin, tmp_path, gunicorn.port) as nginx:
            errors: list = []
            slow = [threading.Thread(target=trickle_head, args=(nginx.port, 3.0, errors), daemon=True) for _ in range(6)]
            for thread in slow:
                thread.start()
            time.sleep(0.5)
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=5)
            conn.request("GET", "/s")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok")
            assert time.monotonic() - started < 2.0
            conn.close()
            for thread in slow:
                thread.join(timeout=10)
    assert errors == []
