"""End to end through the production stack: real gunicorn with deploy/gunicorn.conf.py.

The example config's own requests (the rerank curl and the Langfuse SDK snippet), streaming, large
bodies both ways and start-up failures, each against a recording upstream on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import write_config
from tests.upstream import big_download
from tests.upstream import die_mid_body
from tests.upstream import fixed
from tests.upstream import pattern_sha256
from tests.upstream import sse
from tests.upstream import wait_sent

COHERE_KEY = "co-test-key-7f3a"
LF_PUBLIC = "pk-lf-env-public"
LF_SECRET = "sk-lf-env-secret"
RERANK_BODY = (
    b'{\n    "model": "rerank-english-v3.0",\n    "query": "What is the capital of the United States?",\n'
    b'    "top_n": 3,\n    "documents": ["Carson City is the capital city of the American state of Nevada.",\n'
    b'                  "Washington, D.C. is the capital of the United States."]\n  }'
)
RERANK_ANSWER = b'{"id":"r-1","results":[{"index":1,"relevance_score":0.98},{"index":0,"relevance_score":0.01}],"meta":{"api_version":{"version":"1"}}}'
FIFTY_MB = 50 * 1024 * 1024


def example_config(tmp_path, upstream):
    """The example config.yaml, verbatim except that the two targets point at loopback."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    endpoints = config["general_settings"]["pass_through_endpoints"]
    assert [e["target"] for e in endpoints] == [
        "https://api.cohere.com/v1/rerank",
        "https://us.cloud.langfuse.com/api/public/ingestion",
    ]
    for entry in endpoints:
        entry["target"] = entry["target"].replace("https://api.cohere.com", upstream.url).replace(
            "https://us.cloud.langfuse.com", upstream.url
        )
    return write_config(tmp_path, config)


@pytest.fixture
def example_env(proxy_env):
    return {**proxy_env, "COHERE_API_KEY": COHERE_KEY, "LANGFUSE_DEV_PUBLIC_KEY": LF_PUBLIC, "LANGFUSE_DEV_SK_KEY": LF_SECRET}


@pytest.fixture
def example_proxy(tmp_path, upstream, example_env):
    with run_gunicorn(example_config(tmp_path, upstream), example_env) as server:
        yield server


def test_example_rerank_curl_reaches_cohere_with_the_env_key(upstream, example_proxy):
    upstream.route("/v1/rerank", fixed(200, [("Content-Type", "application/json")], RERANK_ANSWER))
    conn = example_proxy.connection()
    # The example's curl: no proxy key, although master_key: sk-1234 is set.
    conn.request(
        "POST",
        "/v1/rerank",
        body=RERANK_BODY,
        headers={"accept": "application/json", "content-type": "application/json", "User-Agent": "curl/8.5.0"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == RERANK_ANSWER
    assert response.getheader("Content-Type") == "application/json"
    seen = upstream.wait_for_requests(1)[0]
    assert (seen.method, seen.target) == ("POST", "/v1/rerank")
    assert seen.header_all("authorization") == [f"bearer {COHERE_KEY}"]
    assert seen.body == RERANK_BODY
    assert seen.header("user-agent") is None


def test_example_langfuse_sdk_reaches_ingestion_with_env_credentials(upstream, example_proxy, proxy_env):
    upstream.route(
        "/api/public/ingestion",
        fixed(207, [("Content-Type", "application/json")], b'{"successes":[],"errors":[]}'),
    )
    # The Langfuse SDK snippet, run as its own program (the SDK starts background threads).
    snippet = (
        "from langfuse import Langfuse\n"
        f"langfuse = Langfuse(host={example_proxy.url!r}, public_key='anything', secret_key='anything')\n"
        "langfuse.trace(name='example-trace')\n"
        "langfuse.flush()\n"
    )
    env = {k: v for k, v in proxy_env.items() if not k.startswith("LANGFUSE")}
    done = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = upstream.wait_for_requests(1)[0]
    assert (seen.method, seen.path) == ("POST", "/api/public/ingestion")
    expected = "Basic " + base64.b64encode(f"{LF_PUBLIC}:{LF_SECRET}".encode()).decode()
    assert seen.header_all("authorization") == [expected]
    batch = json.loads(seen.body)["batch"]
    assert [event["body"]["name"] for event in batch if event["type"] == "trace-create"] == ["example-trace"]

    conn = example_proxy.connection()
    conn.request("POST", "/api/public/ingestion", body=b'{"batch":[]}', headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert (response.status, response.reason) == (207, "Multi-Status")
    assert response.read() == b'{"successes":[],"errors":[]}'


def read_chunked_events(sock: socket.socket, count: int, deadline: float) -> list[tuple[bytes, float]]:
    """Read a chunked HTTP response head and ``count`` chunks, stamping each arrival."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(65536)
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower(), head
    events = []
    while len(events) < count and time.monotonic() < deadline:
        while b"\r\n" not in buffer:
            buffer += sock.recv(65536)
        size_line, rest = buffer.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += sock.recv(65536)
        events.append((rest[:size], time.monotonic()))
        buffer = rest[size + 2 :]
    return events


@pytest.mark.parametrize(
    ("content_type", "events"),
    [
        (b"text/event-stream", [b"data: {\"n\":%d}\n\n" % i for i in range(4)]),
        (b"application/x-ndjson", [b'{"n":%d}\n' % i for i in range(4)]),
    ],
    ids=["sse", "ndjson"],
)
def test_stream_reaches_caller_event_by_event(tmp_path, upstream, proxy_env, content_type, events):
    handler = upstream.route("/stream", sse(events, interval=0.4, content_type=content_type))
    config = {"general_settings": {"pass_through_endpoints": [{"path": "/s", "target": upstream.url + "/stream"}]}}
    with run_gunicorn(write_config(tmp_path, config), proxy_env) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # The request body says nothing about streaming: content type alone is enough.
            sock.sendall(b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            received = read_chunked_events(sock, len(events), time.monotonic() + 10)
    assert [data for data, _ in received] == events
    sent_at = wait_sent(handler, len(events))
    for index in range(len(events) - 1):
        # The caller read event i before the upstream even wrote event i+1.
        assert received[index][1] < sent_at[index + 1], index


def test_fifty_megabytes_each_way(tmp_path, upstream, proxy_env):
    upstream.route("/down", big_download(FIFTY_MB))
    config = {
        "general_settings": {
            "pass_through_endpoints": [
                {"path": "/up", "target": upstream.url + "/up"},
                {"path": "/down", "target": upstream.url + "/down"},
            ]
        }
    }
    block = bytes(range(256)) * 256  # 64 KiB
    expected = hashlib.sha256(block * (FIFTY_MB // len(block))).hexdigest()
    with run_gunicorn(write_config(tmp_path, config), proxy_env) as server:
        for chunked in (False, True):
            conn = server.connection(timeout=60)
            body = (block for _ in range(FIFTY_MB // len(block)))
            headers = {"Content-Type": "application/octet-stream"}
            if not chunked:
                headers["Content-Length"] = str(FIFTY_MB)
            conn.request("POST", "/up", body=body, headers=headers, encode_chunked=chunked)
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            conn.close()
        conn = server.connection(timeout=60)
        conn.request("GET", "/down")
        response = conn.getresponse()
        assert response.getheader("Content-Length") == str(FIFTY_MB)
        digest = hashlib.sha256()
        while chunk := response.read(1 << 20):
            digest.update(chunk)
        assert digest.hexdigest() == pattern_sha256(FIFTY_MB)
    uploads = upstream.wait_for_requests(3)[:2]
    assert [(r.body_len, r.sha256, r.chunked) for r in uploads] == [(FIFTY_MB, expected, False), (FIFTY_MB, expected, True)]
    assert uploads[0].header("content-length") == str(FIFTY_MB) and uploads[0].header("transfer-encoding") is None
    assert uploads[1].header("transfer-encoding") == "chunked" and uploads[1].header("content-length") is None


def test_mid_body_failure_truncates_the_callers_response(tmp_path, upstream, proxy_env):
    upstream.route("/t", die_mid_body(100_000, b"x" * 1000))
    config = {"general_settings": {"pass_through_endpoints": [{"path": "/p", "target": upstream.url + "/t"}]}}
    with run_gunicorn(write_config(tmp_path, config), proxy_env) as server:
        conn = server.connection(timeout=10)
        conn.request("GET", "/p")
        response = conn.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        log = server.log()
    assert "Traceback" not in log


def test_invalid_config_stops_gunicorn_before_serving(tmp_path, proxy_env):
    config = {
        "general_settings": {
            "master_key": "sk-never-printed",
            "pass_through_endpoints": [
                {"path": "/ok", "target": "http://127.0.0.1:9/x", "headers": {"Authorization": "Bearer os.environ/SECRET"}},
                {"path": "/bad", "target": "http://127.0.0.1:9/y", "include_subpaths": True,
                 "headers": {"X-Key": "os.environ/NOT_SET_ANYWHERE"}},
            ],
        }
    }
    path = write_config(tmp_path, config)
    with run_gunicorn(path, proxy_env, wait=False) as server:
        assert server.proc.wait(timeout=20) != 0
        log = server.log()
    assert f"{path}: pass_through_endpoints[1] (/bad).include_subpaths: unknown field; did you mean 'include_subpath'?" in log
    assert f"{path}: pass_through_endpoints[1] (/bad).headers.X-Key: environment variable NOT_SET_ANYWHERE is not set" in log
    assert "Traceback" not in log
    assert "sk-never-printed" not in log and proxy_env["SECRET"] not in log
