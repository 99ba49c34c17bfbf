"""Operations, the way an operator uses them: the CLI, HUP reload under load, the JSON
access log, --detailed_debug, and /metrics summed over several gunicorn workers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy_app.cli import main as cli_main
from tests.conftest import SECRET
from tests.gunicorn_proc import parse_metrics
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import stop_process
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.upstream import fixed
from tests.upstream import sse
from tests.upstream import stall
from tests.upstream import wait_sent

MASTER = "sk-master-operations-5150"
CALLER_KEY = "caller-secret-token-9911"
QUERY_SECRET = "query-secret-3344"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def json_lines(text: str) -> list[dict]:
    """Access lines, minus the readiness probes the test harness itself sent."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [line for line in lines if line["path"] != "/health/readiness"]


# -- check -----------------------------------------------------------------------------

def test_check_prints_the_route_table_without_values(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SECRET", SECRET)
    path = write_config(
        tmp_path,
        {
            "general_settings": {
                "master_key": MASTER,
                "pass_through_endpoints": [
                    {
                        "path": "/v1/rerank",
                        "target": "https://api.cohere.com/v1/rerank",
                        "headers": {"Authorization": "bearer os.environ/SECRET"},
                    },
                    {"path": "/lf", "target": "https://lf.example:8443/x", "auth": True, "include_subpath": True, "methods": ["post"]},
                ],
            }
        },
    )
    assert cli_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"/v1/rerank\s+DELETE,GET,HEAD,OPTIONS,PATCH,POST,PUT\s+api\.cohere\.com\s+open\s+no\s+Authorization", out)
    assert re.search(r"/lf\s+POST\s+lf\.example:8443\s+keys\s+yes\s+-", out)
    assert SECRET not in out and MASTER not in out


def test_check_lists_every_error_and_exits_1(tmp_path, capsys):
    path = write_config(
        tmp_path,
        {
            "general_settings": {
                "pass_through_endpoints": [{"path": "x", "target": "ftp://h"}, {"path": "/ok", "target": "http://h", "auth": "true"}]
            }
        },
    )
    assert cli_main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"config error: {path}: pass_through_endpoints[0] (x).path: must start with '/'",
        f"config error: {path}: pass_through_endpoints[0] (x).target: must be an absolute http:// or https:// URL with a host",
        f"config error: {path}: pass_through_endpoints[1] (/ok).auth: must be a YAML boolean (true or false, unquoted), got str 'true'",
    ]


# -- the CLI serves, and HUP reloads ---------------------------------------------------

@contextmanager
def cli_server(config_path: Path, env: dict, extra: tuple = ()):
    port = free_port()
    log_path = config_path.parent / "cli.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy_app", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port), *extra],
            cwd=config_path.parent,  # the CLI needs no checkout: the settings and the app are in the package
            env={**env, "PROXY_GRACEFUL_TIMEOUT": "5", "PROXY_THREADS": "4"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, 20, "the CLI server")
        assert proc.poll() is None, log_path.read_text()
        yield proc, port, log_path
    finally:
        stop_process(proc)


def _answers(port: int) -> bool:
    try:
        return get(port, "/health/readiness", timeout=1)[0] == 200
    except OSError:
        return False


class LoadLoop(threading.Thread):
    """GET one path again and again on fresh connections until stopped (bounded)."""

    def __init__(self, port: int, path: str, max_requests: int = 3000, max_seconds: float = 30):
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.max_requests, self.deadline = max_requests, time.monotonic() + max_seconds
        self.stopping = threading.Event()
        self.done, self.failures = 0, []

    def run(self):
        while not self.stopping.is_set() and self.done < self.max_requests and time.monotonic() < self.deadline:
            try:
                status, _ = get(self.port, self.path, timeout=5)
                if status != 200:
                    self.failures.append(status)
            except OSError as exc:
                self.failures.append(repr(exc))
            self.done += 1


def test_cli_serves_and_hup_reloads_with_no_failed_request(tmp_path, upstream, proxy_env):
    for path in ("/a", "/a2", "/gone", "/new"):
        upstream.route(path, fixed(200, [("Content-Type", "text/plain")], path.encode()))

    def config(*entries):
        return {"general_settings": {"pass_through_endpoints": [{"path": p, "target": upstream.url + t} for p, t in entries]}}

    config_path = write_config(tmp_path, config(("/a", "/a"), ("/gone", "/gone")))
    with cli_server(config_path, proxy_env, ("--num_workers", "2")) as (proc, port, log_path):
        assert get(port, "/a") == (200, b"/a")
        load = LoadLoop(port, "/a")
        load.start()
        try:
            wait_until(lambda: load.done >= 20, 10, "load before the reload")
            write_config(tmp_path, config(("/a", "/a2"), ("/new", "/new")))
            os.kill(proc.pid, signal.SIGHUP)
            wait_until(lambda: get(port, "/new")[0] == 200, 20, "the new route")
            assert get(port, "/gone")[0] == 404
            wait_until(lambda: get(port, "/a") == (200, b"/a2"), 10, "the changed route")

            done_before = load.done
            (tmp_path / "config.yaml").write_text("general_settings:\n  pass_through_endpoints:\n    - path: /broken\n      targt: http://x\n")
            os.kill(proc.pid, signal.SIGHUP)
            wait_until(lambda: "still serving the previous one" in log_path.read_text(), 20, "the rejected reload")
            wait_until(lambda: load.done >= done_before + 20, 10, "load after the rejected reload")
            assert get(port, "/new") == (200, b"/new")
            assert get(port, "/a") == (200, b"/a2")
        finally:
            load.stopping.set()
            load.join(timeout=10)
        assert proc.poll() is None
    log = log_path.read_text()
    assert load.failures == [], load.failures
    assert load.done >= 60
    assert "pass_through_endpoints[0] (/broken).targt: unknown field; did you mean 'target'?" in log
    print(f"reload under load: {load.done} requests, {len(load.failures)} failed")


def test_cli_refuses_an_invalid_config(tmp_path, proxy_env):
    config_path = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/x"}]}})
    done = subprocess.run(
        [sys.executable, "-m", "proxy_app", "--config", str(config_path), "--port", str(free_port())],
        cwd=tmp_path, env=proxy_env, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode != 0
    assert f"config error: {config_path}: pass_through_endpoints[0] (/x).target: is required" in done.stderr
    assert "Traceback" not in done.stderr


# -- access log, debug log, secrets ----------------------------------------------------

def secret_config(upstream) -> dict:
    return {
        "general_settings": {
            "master_key": MASTER,
            "pass_through_endpoints": [
                {
                    "path": "/p",
                    "target": upstream.url + "/t",
                    "headers": {"Authorization": "Bearer os.environ/SECRET"},
                    "default_query_params": {"key": QUERY_SECRET},
                    "forward_headers": True,
                    "cost_per_request": 0.25,
                },
                {"path": "/s", "target": upstream.url + "/stream", "auth": True},
                {"path": "/dead", "target": "http://127.0.0.1:9/x", "headers": {"x-api-key": "os.environ/SECRET"}},
            ],
        }
    }


def exercise(port: int) -> None:
    """One request of each kind, each carrying secrets the logs must not show."""
    assert get(port, "/p?token=" + CALLER_KEY, {"Authorization": f"Bearer {MASTER}", "X-Caller": CALLER_KEY})[0] == 200
    assert get(port, "/s", {"x-litellm-api-key": MASTER})[0] == 200
    assert get(port, "/s", {"Authorization": f"Bearer {CALLER_KEY}"})[0] == 401
    assert get(port, "/dead")[0] == 502
    assert get(port, "/nowhere")[0] == 404


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
@pytest.mark.parametrize("detailed", [True, False], ids=["detailed_debug", "plain"])
def test_logs_never_carry_a_secret(tmp_path, upstream, proxy_env, level, detailed):
    upstream.route("/stream", sse([b"data: 1\n\n", b"data: 2\n\n"], interval=0.05))
    env = {**proxy_env, "PROXY_LOG_LEVEL": level, "DETAILED_DEBUG": "1" if detailed else ""}
    with run_gunicorn(write_config(tmp_path, secret_config(upstream)), env) as server:
        exercise(server.port)
        wait_until(lambda: len(json_lines(server.log())) >= 5, 10, "five access lines")
        log = server.log()
    for secret in (SECRET, MASTER, CALLER_KEY, QUERY_SECRET):
        assert secret not in log, secret
    assert "Traceback" not in log
    if detailed:
        assert "call " in log and "-> GET" in log and "Authorization: ***" in log
        assert "query names ['token', 'key']" in log
    else:
        assert "-> GET" not in log


def test_access_log_has_one_json_line_per_request_when_its_body_is_done(tmp_path, upstream, proxy_env):
    handler = upstream.route("/stream", sse([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"], interval=0.3))
    with run_gunicorn(write_config(tmp_path, secret_config(upstream)), proxy_env) as server:
        exercise(server.port)
        wait_until(lambda: len(json_lines(server.log())) >= 5, 10, "five access lines")
        conn = server.connection()
        conn.request("GET", "/s", headers={"x-litellm-api-key": MASTER})
        response = conn.getresponse()
        response.read1(64)  # the first event is here; the stream is still open
        assert len(json_lines(server.log())) == 5
        assert response.read() == b"data: 2\n\ndata: 3\n\n"
        lines = wait_until(lambda: (ls := json_lines(server.log())) and len(ls) >= 6 and ls, 10, "the stream's line")
    assert len(wait_sent(handler, 3)) == 3
    fields = {"time", "method", "path", "route", "status", "request_bytes", "response_bytes", "duration_ms", "ttfb_ms",
              "call_id", "cost_per_request", "upstream_error"}
    assert all(set(line) == fields for line in lines)
    by_status = {(line["path"], line["status"]): line for line in lines}
    ok = by_status[("/p", 200)]
    assert ok["route"] == "/p" and ok["cost_per_request"] == 0.25 and ok["ttfb_ms"] is not None and ok["call_id"]
    assert ok["response_bytes"] > 0 and ok["upstream_error"] is None
    assert by_status[("/dead", 502)]["upstream_error"] == "connection_refused"  # port 9 on loopback: nothing listens
    assert by_status[("/s", 401)]["route"] == "/s" and by_status[("/s", 401)]["ttfb_ms"] is None
    assert by_status[("/nowhere", 404)]["route"] is None
    stream = lines[-1]
    assert (stream["path"], stream["status"], stream["response_bytes"]) == ("/s", 200, 27)
    assert stream["duration_ms"] >= 600


# -- metrics ---------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    status, body = get(port, "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def test_metrics_sum_over_two_workers(tmp_path, upstream, proxy_env):
    upstream.route("/slow", stall(0.2))
    config = {"general_settings": {"pass_through_endpoints": [{"path": "/p", "target": upstream.url + "/slow"}]}}
    metrics_dir = tmp_path / "prometheus"
    # Two threads and two connection slots per worker: eight concurrent callers must be
    # spread over both workers.
    env = {**proxy_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PROXY_WORKER_CONNECTIONS": "2"}
    with run_gunicorn(write_config(tmp_path, config), env, workers=2, threads=2) as server:
        workers = set(wait_until(lambda: len(pids := server.worker_pids()) == 2 and pids, 20, "two workers"))
        results = []

        def call():
            results.append(get(server.port, "/p", timeout=20)[0])

        threads = [threading.Thread(target=call) for _ in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == [200] * 24
        writers = {int(m.group(1)) for f in os.listdir(metrics_dir) if (m := re.match(r"counter_(\d+)\.db", f))}
        assert workers <= writers, "both workers served requests"
        for _ in range(4):  # whichever worker answers the scrape, the sums are the same
            samples = scrape(server.port)
            assert samples['proxy_requests_total{method="GET",route="/p",status="200"}'] == 24
            assert samples['proxy_request_duration_seconds_count{route="/p"}'] == 24
            assert samples['proxy_upstream_ttfb_seconds_count{route="/p"}'] == 24
            assert samples['proxy_response_bytes_total{route="/p"}'] == 24 * len(b"late")
            assert samples['proxy_streams_in_flight{route="/p"}'] == 0
