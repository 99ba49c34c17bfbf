"""The production stack behind nginx: Debian's nginx with deploy/nginx.conf, in front of the
real gunicorn (deploy/gunicorn.conf.py), in front of a recording upstream.

The site file is used as shipped, except for two substitutions: its ``listen 80;`` becomes
a free loopback port and its ``server 127.0.0.1:4000;`` becomes the test gunicorn's port. It
is wrapped in a minimal main config whose pid, logs and temp paths all live in tmp_path.
(The error-page tests make one or two more, named where they are made, each required to
match exactly once.)

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
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import stop_process
from tests.gunicorn_proc import write_config
from tests.test_e2e import read_chunked_events
from tests.upstream import fixed
from tests.upstream import sse
from tests.upstream import stall
from tests.upstream import wait_sent

SITE = ROOT / "deploy" / "nginx.conf"
LISTEN = "listen 80;"
UPSTREAM_SERVER = "server 127.0.0.1:4000;"
START_TIMEOUT = 15.0
FIFTY_MIB = 50 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB
# The production setting for gunicorn behind this site (deploy/nginx.conf, X-Client-Connection).
TRUST_FRONT_ENV = {"PROXY_TRUST_CLIENT_CONNECTION": "1"}


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


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{SITE} must contain {old!r} exactly once"
    return text.replace(old, new)


def site_config(listen_port: int, gunicorn_port: int) -> str:
    """deploy/nginx.conf with the two test substitutions, each required exactly once."""
    text = SITE.read_text()
    text = replace_once(text, LISTEN, f"listen 127.0.0.1:{listen_port};")
    return replace_once(text, UPSTREAM_SERVER, f"server 127.0.0.1:{gunicorn_port};")


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
def run_nginx(nginx: str, directory: Path, gunicorn_port: int, edit: Callable[[str], str] | None = None):
    """Start nginx with the site in front of gunicorn_port; yield once it answers.

    ``edit``, if given, rewrites the rendered site text (a test-only change).
    """
    prefix = directory / "nginx"
    prefix.mkdir()
    for attempt in range(3):
        # The port is free now; another process could take it before nginx binds it, so an
        # "Address already in use" start is retried with a new port.
        port = free_port()
        site = prefix / "site.conf"
        text = site_config(port, gunicorn_port)
        site.write_text(edit(text) if edit else text)
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


@contextmanager
def run_stack(tmp_path: Path, proxy_env: dict, nginx_bin: str, endpoints: list, edit: Callable[[str], str] | None = None):
    """gunicorn with these endpoints, set up as in production, and the site in front of it."""
    config = {"general_settings": {"pass_through_endpoints": endpoints}}
    with run_gunicorn(write_config(tmp_path, config), {**proxy_env, **TRUST_FRONT_ENV}) as gunicorn:
        with run_nginx(nginx_bin, tmp_path, gunicorn.port, edit) as nginx:
            yield gunicorn, nginx


@pytest.fixture
def stack(tmp_path, upstream, proxy_env, nginx_bin):
    endpoints = [
        {"path": "/s", "target": upstream.url + "/stream"},
        {"path": "/up", "target": upstream.url + "/up"},
        {"path": "/fwd", "target": upstream.url + "/fwd", "forward_headers": True},
    ]
    with run_stack(tmp_path, proxy_env, nginx_bin, endpoints) as (gunicorn, nginx):
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
    _gunicorn, nginx = stack
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
    _gunicorn, nginx = stack
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
    _gunicorn, nginx = stack
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
    _gunicorn, nginx = stack

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



# --------------------------------------------------------------------------
# Errors nginx makes itself: proxy_app's JSON envelope
# --------------------------------------------------------------------------


def exchange(port: int, method: str, path: str, headers=(), body: bytes | None = None) -> tuple[int, list, bytes]:
    """One request with exactly these headers (after Host), in order; (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "llm-proxy.example.internal")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def header(headers: list, name: str) -> str | None:
    values = [value for key, value in headers if key.lower() == name.lower()]
    assert len(values) <= 1, (name, headers)
    return values[0] if values else None


def assert_nginx_json_error(status: int, headers: list, body: bytes, code: int, kind: str, log: str) -> None:
    """The site's error page: the envelope of proxy_app/errors.py error_response, byte-compact."""
    assert status == code, (status, body, log)
    assert header(headers, "Content-Type") == "application/json", headers
    assert header(headers, "x-litellm-call-id") is None, headers  # nginx's, not proxy_app's
    error = json.loads(body)
    assert json.dumps(error, separators=(",", ":")).encode() == body  # the app's compact form
    assert list(error) == ["error"] and list(error["error"]) == ["message", "type", "param", "code"], error
    message = error["error"]["message"]
    assert error["error"]["type"] == kind and error["error"]["param"] is None
    assert error["error"]["code"] == str(code)
    assert message.startswith("The proxy") and message.endswith("."), message
    assert "nginx" not in message and "127.0.0.1" not in message, message


def test_gunicorn_down_answers_json_502_through_nginx(upstream, stack):
    gunicorn, nginx = stack
    stop_process(gunicorn.proc)  # by PID; run_gunicorn's own stop then finds it gone
    assert gunicorn.proc.poll() is not None
    for method, path, body in (("GET", "/s", None), ("POST", "/up", b'{"model":"x"}'), ("GET", "/health/readiness", None)):
        status, headers, answer = exchange(nginx.port, method, path, [("Content-Type", "application/json")], body)
        assert_nginx_json_error(status, headers, answer, 502, "proxy_unavailable", nginx.log())
    assert upstream.requests == []


READ_TIMEOUT = "proxy_read_timeout 630s;"
ROOT_LOCATION = "    location / {\n"
NGINX_503_PATH = "/nginx-test-503"


def short_timeout_and_503(text: str) -> str:
    """Test-only site edits: a 1 s read timeout (a 504 in a second, not 630) and a location
    where nginx itself answers 503, as it does for a limit_req or limit_conn refusal."""
    text = replace_once(text, READ_TIMEOUT, "proxy_read_timeout 1s;")
    return replace_once(text, ROOT_LOCATION, f"    location = {NGINX_503_PATH} {{\n        return 503;\n    }}\n\n{ROOT_LOCATION}")


def test_nginx_503_and_504_answer_json(tmp_path, upstream, proxy_env, nginx_bin):
    upstream.route("/slow", stall(3.0))
    endpoints = [{"path": "/slow", "target": upstream.url + "/slow"}]
    with run_stack(tmp_path, proxy_env, nginx_bin, endpoints, short_timeout_and_503) as (_gunicorn, nginx):
        for method, body in (("GET", None), ("POST", b"{}")):
            status, headers, answer = exchange(nginx.port, method, NGINX_503_PATH, body=body)
            assert_nginx_json_error(status, headers, answer, 503, "proxy_unavailable", nginx.log())

        started = time.monotonic()
        status, headers, answer = exchange(nginx.port, "POST", "/slow", [("Content-Type", "application/json")], b"{}")
        assert_nginx_json_error(status, headers, answer, 504, "proxy_timeout", nginx.log())
        assert time.monotonic() - started < 2.9  # nginx's 1 s timeout, before the upstream's 3 s
        assert upstream.wait_for_requests(1)[0].path == "/slow"


def test_proxy_app_own_and_relayed_errors_pass_through_nginx_unchanged(tmp_path, upstream, proxy_env, nginx_bin):
    # error_page must not touch a 502/503/504 that came from gunicorn (proxy_intercept_errors
    # off): proxy_app's own errors and the upstream's are relayed with their own bodies.
    upstream.route("/slow", stall(3.0))
    relayed = {}
    for code in (502, 503, 504):
        relayed[code] = b"<html><body>upstream says %d</body></html>" % code
        upstream.route(f"/u{code}", fixed(code, [("Content-Type", "text/html"), ("Content-Length", str(len(relayed[code])))], relayed[code]))
    endpoints = [
        {"path": "/down", "target": f"http://127.0.0.1:{free_port()}/x"},  # nothing listens: proxy_app's 502
        {"path": "/slow", "target": upstream.url + "/slow", "timeout": 0.5},  # proxy_app's 504
        *({"path": f"/u{code}", "target": upstream.url + f"/u{code}"} for code in relayed),
    ]
    with run_stack(tmp_path, proxy_env, nginx_bin, endpoints) as (gunicorn, nginx):
        for path, code in (("/down", 502), ("/slow", 504), ("/u502", 502), ("/u503", 503), ("/u504", 504)):
            via_nginx = exchange(nginx.port, "GET", path)
            direct = exchange(gunicorn.port, "GET", path)
            for status, headers, body in (via_nginx, direct):
                assert status == code, (path, status, body, nginx.log())
                assert header(headers, "x-litellm-call-id"), (path, headers)  # proxy_app answered
            assert via_nginx[2] == direct[2], path
            assert header(via_nginx[1], "Content-Type") == header(direct[1], "Content-Type"), path
            if path.startswith("/u"):
                assert via_nginx[2] == relayed[code] and header(via_nginx[1], "Content-Type") == "text/html"
            else:
                error = json.loads(via_nginx[2])["error"]
                assert error["type"] in ("upstream_error", "upstream_timeout") and error["code"] == str(code), error


# --------------------------------------------------------------------------
# Hop-by-hop request headers behind the site
# --------------------------------------------------------------------------

# Each of these describes the caller's connection to the front; none may reach the upstream.
HOP_HEADERS = [
    ("Connection", "keep-alive, X-Client-Hop, HTTP2-Settings, Upgrade, X-Real-IP, X-Forwarded-For"),
    ("X-Client-Hop", "1"),
    ("Upgrade", "h2c"),
    ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
    ("TE", "trailers"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
]


def names_seen(upstream, count: int) -> list[list[str]]:
    """Header names, exactly as the upstream received them, of its first `count` requests."""
    return [[name for name, _ in seen.headers] for seen in upstream.wait_for_requests(count)]


def test_hop_by_hop_headers_stop_at_the_front_as_with_gunicorn_alone(upstream, stack):
    gunicorn, nginx = stack
    caller = [
        *HOP_HEADERS,
        # A caller naming the front's own headers in Connection cannot take them away: the
        # site sets X-Real-IP and X-Forwarded-For itself, after the caller's hop.
        ("X-Real-IP", "6.6.6.6"),
        ("X-Forwarded-For", "5.5.5.5"),
        ("X-Keep", "2"),
    ]
    # A forged X-Client-Connection naming X-Keep: the site replaces it with the caller's
    # real Connection value, so X-Keep still arrives.
    forged = [("X-Client-Connection", "x-keep")]
    assert exchange(nginx.port, "GET", "/fwd", caller + forged)[0] == 200
    assert exchange(gunicorn.port, "GET", "/fwd", caller)[0] == 200  # gunicorn alone
    via_nginx, alone = upstream.wait_for_requests(2)
    assert names_seen(upstream, 2) == [
        ["Host", "X-Real-Ip", "X-Keep", "X-Forwarded-For"],
        ["Host", "X-Keep", "X-Forwarded-For"],
    ]
    assert via_nginx.header("x-real-ip") == "127.0.0.1"  # the site's $remote_addr
    # The caller's claim, the site's $remote_addr, and proxy_app's peer (nginx).
    assert via_nginx.header("x-forwarded-for") == "5.5.5.5, 127.0.0.1, 127.0.0.1"
    assert alone.header("x-forwarded-for") == "127.0.0.1"  # the caller named it: only the peer


def test_fixed_hop_by_hop_headers_stop_at_the_front_without_connection(upstream, stack):
    # No Connection header at all: the fixed hop-by-hop names still never arrive, and a
    # caller's own X-Client-Connection is still removed (with $http_connection empty, nginx
    # sends no X-Client-Connection, and never the caller's), so X-Keep arrives.
    _gunicorn, nginx = stack
    caller = [*HOP_HEADERS[2:], ("X-Client-Connection", "x-keep"), ("X-Keep", "2")]
    assert exchange(nginx.port, "GET", "/fwd", caller)[0] == 200
    assert names_seen(upstream, 1) == [["Host", "X-Real-Ip", "X-Keep", "X-Forwarded-For"]]


def test_without_the_trust_setting_a_sent_x_client_connection_is_ignored(tmp_path, upstream, proxy_env):
    # gunicorn exposed alone, as by default: X-Client-Connection means nothing and goes nowhere.
    config = {"general_settings": {"pass_through_endpoints": [{"path": "/fwd", "target": upstream.url + "/fwd", "forward_headers": True}]}}
    env = {key: value for key, value in proxy_env.items() if key not in TRUST_FRONT_ENV}
    with run_gunicorn(write_config(tmp_path, config), env) as gunicorn:
        caller = [("X-Client-Connection", "x-keep, x-other"), ("X-Keep", "2"), ("X-Other", "3")]
        assert exchange(gunicorn.port, "GET", "/fwd", caller)[0] == 200
    assert names_seen(upstream, 1) == [["Host", "X-Keep", "X-Other", "X-Forwarded-For"]]
