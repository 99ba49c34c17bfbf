"""A caller that leaves mid-stream is recorded as such (status 499 in the access line and
in proxy_requests_total, as Caddy and nginx log it), never as a clean end."""

from __future__ import annotations

import json
import socket

from tests.conftest import subprocess_env
from tests.gunicorn_proc import parse_metrics
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream
from tests.upstream import sse

EVENTS = [b"data: %d\n\n" % i for i in range(40)]


def access_lines(log: str) -> list[dict]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line["route"] == "/sse"]


def metric(server, sample: str) -> float | None:
    conn = server.connection()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return parse_metrics(text).get(sample)


def test_caller_leaving_mid_stream_is_499_in_the_log_and_metrics(tmp_path):
    with Upstream() as up:
        up.route("/events", sse(EVENTS, 0.05))
        config = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/sse", "target": up.url + "/events"}]}})
        with run_gunicorn(config, subprocess_env(), workers=1) as server:
            # One caller reads the whole stream: a clean 200.
            conn = server.connection()
            conn.request("GET", "/sse")
            assert conn.getresponse().read() == b"".join(EVENTS)
            conn.close()
            # One caller reads the head and the first event, then goes away.
            caller = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            caller.sendall(b"GET /sse HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
            received = b""
            while b"data: 0" not in received:
                received += caller.recv(65536)
            caller.close()
            lines = wait_until(lambda: len(access_lines(server.log())) >= 2 and access_lines(server.log()), 10, "two access lines")
            clean, left = lines[:2]
            assert (clean["route"], clean["status"], clean["upstream_error"]) == ("/sse", 200, None)
            assert (left["route"], left["status"], left["upstream_error"]) == ("/sse", 499, None)
            assert 0 < left["response_bytes"] < clean["response_bytes"]
            assert metric(server, 'proxy_requests_total{method="GET",route="/sse",status="499"}') == 1.0
            assert metric(server, 'proxy_requests_total{method="GET",route="/sse",status="200"}') == 1.0
