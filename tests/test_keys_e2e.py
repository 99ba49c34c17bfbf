"""Virtual keys end to end: the production stack (gunicorn, 3 workers) on the embedded SQLite store.

Everything goes through real processes: keys are made with the admin API (``/key/generate``
with the master key), used on ``auth: true`` endpoints, and the recording upstream
(tests/upstream.py) shows what reached it. Limits are checked where they matter, across the
three workers: exact admission counts under a concurrent burst, the peak concurrency a slow
upstream sees, slots coming back after a caller aborts a stream and after a worker is killed
with SIGKILL, revocation reaching every worker within 2 s, usage rows in ``/spend/logs`` and
none lost across a HUP.

Which worker served a request is read from the kernel (:func:`serving_pid`: the worker holding
the server side of our TCP connection), so "every worker" below is checked, not hoped for.

The helpers here (:func:`call`, :func:`generate`, :func:`spend_rows`, ...) are also used by
tests/test_keys_cluster.py and tests/test_openai_sdk.py.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import MASTER_KEY
from tests.conftest import config_for
from tests.conftest import subprocess_env
from tests.gunicorn_proc import Gunicorn
from tests.gunicorn_proc import parse_metrics
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream
from tests.upstream import fixed
from tests.upstream import sse
from tests.upstream import stall

WORKERS = 3
THREADS = 8
COST = 0.25  # cost_per_request of /v1/paid
REVOCATION_SECONDS = 2.0  # a block, delete, unblock or update reaches every worker within this
USAGE_SECONDS = 10.0  # a finished request's usage row is in /spend/logs within this
KILL_SECONDS = 60.0  # a SIGKILLed worker's slot comes back within this


# -- helpers (shared with the other key test modules) -----------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict  # lower-cased names
    body: bytes
    pid: int | None = None  # the worker that served it, when asked for

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r}, pid={self.pid})"


def call(
    server: Gunicorn,
    method: str,
    path: str,
    key: str | None = None,
    body=None,
    headers: dict | None = None,
    timeout: float = 15.0,
    want_pid: bool = False,
) -> Answer:
    """One request on a fresh connection (so successive calls may reach any worker).

    ``body`` may be bytes or a JSON-able object; ``key`` goes in ``Authorization: Bearer``.
    ``want_pid`` looks up the worker that served it while the connection is still open.
    """
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        pid = serving_pid(server, conn.sock) if want_pid and conn.sock is not None else None
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data, pid)
    finally:
        conn.close()


def serving_pid(server: Gunicorn, sock: socket.socket) -> int | None:
    """The gunicorn worker holding the server side of our connection ``sock`` (or None).

    The kernel lists the server-side socket (local port = the proxy's, remote port = ours) in
    /proc/net/tcp with its inode; the worker is the process with a descriptor on that inode.
    """
    client_port = sock.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server.port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inode = fields[9]
                break
    if not inode or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in server.worker_pids():
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == target:
                    return pid
            except OSError:
                continue
    return None


def admin(server: Gunicorn, method: str, path: str, body=None, key: str = MASTER_KEY) -> Answer:
    return call(server, method, path, key=key, body=body)


def generate(server: Gunicorn, **fields) -> dict:
    """POST /key/generate with the master key; the answer (``key`` is the plaintext)."""
    answer = admin(server, "POST", "/key/generate", fields)
    assert answer.status == 200, answer
    return answer.json()


def spend_rows(server: Gunicorn, **query) -> list[dict]:
    """Every /spend/logs row matching ``query`` (all pages, bounded)."""
    rows: list[dict] = []
    for page in range(1, 51):
        params = "&".join(f"{k}={v}" for k, v in {**query, "limit": 100, "page": page}.items())
        answer = admin(server, "GET", f"/spend/logs?{params}")
        assert answer.status == 200, answer
        batch = answer.json()
        assert isinstance(batch, list), batch
        rows += batch
        if len(batch) < 100:
            return rows
    raise AssertionError("more than 50 pages of /spend/logs")


def wait_rows(server: Gunicorn, call_ids: set[str], timeout: float = USAGE_SECONDS, **query) -> list[dict]:
    """The /spend/logs rows of ``call_ids`` once all are there (bounded)."""
    found: list[dict] = []

    def all_there():
        nonlocal found
        found = [row for row in spend_rows(server, **query) if row.get("request_id") in call_ids]
        return {row["request_id"] for row in found} == call_ids

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all_there():
            return found
        time.sleep(0.25)
    missing = call_ids - {row["request_id"] for row in found}
    raise AssertionError(f"{len(missing)} of {len(call_ids)} usage rows not in /spend/logs after {timeout}s: {sorted(missing)[:5]}")


def metrics_of(server: Gunicorn) -> dict[str, float]:
    answer = call(server, "GET", "/metrics")
    assert answer.status == 200, answer
    return parse_metrics(answer.body.decode())


def concurrently(count: int, fn, timeout: float = 60.0) -> list:
    """Run ``fn(i)`` in ``count`` threads released together; their results (bounded join)."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i):
        try:
            barrier.wait(timeout=10)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported as the thread's result
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "threads still running"
    return results


def cover_workers(server: Gunicorn, key: str, path: str, max_requests: int = 300, max_seconds: float = 20.0) -> dict[int, list[Answer]]:
    """Call ``path`` with ``key`` on fresh connections until every worker answered at least once.

    :returns: the answers by worker pid (every answer is kept, to be checked by the caller).
    """
    workers = set(server.worker_pids())
    seen: dict[int, list[Answer]] = {}
    deadline = time.monotonic() + max_seconds
    for _ in range(max_requests):
        if workers <= set(seen) or time.monotonic() > deadline:
            break
        answer = call(server, "GET", path, key=key, want_pid=True)
        if answer.pid is not None:
            seen.setdefault(answer.pid, []).append(answer)
    assert workers <= set(seen), f"workers {sorted(workers)} not all reached in {max_requests} requests: {sorted(seen)}"
    return seen


def held(seconds: float):
    """An upstream handler that holds each request ``seconds`` and records the peak number held.

    The count drops before the answer is sent: the proxy can only admit the next request once
    it relayed this answer, so the peak is never overstated by a race with our bookkeeping.
    """
    lock = threading.Lock()

    def handler(req, w):
        with lock:
            handler.now += 1
            handler.count += 1
            handler.peak = max(handler.peak, handler.now)
        completed = w.sleep(seconds)
        with lock:
            handler.now -= 1
        if completed:
            w.respond(200, [("Content-Type", "text/plain")], b"held")
        else:
            w.close()

    handler.now = handler.peak = handler.count = 0
    return handler


def not_after(start, end) -> bool:
    """start <= end, for epoch numbers or ISO 8601 strings of one format."""
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        return start <= end
    return str(start) <= str(end)


def upstream_paths(upstream: Upstream, path: str) -> list:
    return [r for r in upstream.requests if r.path == path]


def keyed_endpoints(upstream_url: str) -> list[dict]:
    """The endpoints every key test serves: sub-paths of /v1/keyed pick an upstream handler."""
    return [
        {"path": "/v1/keyed", "target": upstream_url + "/k", "include_subpath": True, "auth": True},
        {"path": "/v1/other", "target": upstream_url + "/o", "auth": True},
        {"path": "/v1/paid", "target": upstream_url + "/p", "include_subpath": True, "auth": True, "cost_per_request": COST},
        {"path": "/open", "target": upstream_url + "/open"},
    ]


def instance_env(state_dir: Path, **extra: str) -> dict:
    """The environment of one proxy instance: its own state directory (SQLite file, spool)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return {**subprocess_env(), "STATE_DIRECTORY": str(state_dir), **extra}


def warnings_by_pid(log: str, pattern: str) -> dict[int, int]:
    """WARNING lines matching ``pattern`` (case-insensitive) per process, from gunicorn's log."""
    counts: dict[int, int] = {}
    for match in re.finditer(r"^\S+ \S+ \[(\d+)\] WARNING (.*)$", log, re.MULTILINE):
        if re.search(pattern, match.group(2), re.IGNORECASE):
            counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    return counts


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up():
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(up, tmp_path_factory):
    base = tmp_path_factory.mktemp("keys-e2e")
    config = write_config(base, config_for(*keyed_endpoints(up.url)))
    with run_gunicorn(config, instance_env(base / "state"), workers=WORKERS, threads=THREADS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        yield server


# -- keys on auth: true endpoints ---------------------------------------------------------------


def test_generated_key_reaches_the_upstream_and_no_proxy_key_does(proxy, up):
    made = generate(proxy, key_alias="e2e-basic")
    key = made["key"]
    assert key.startswith("sk-") and made["key_alias"] == "e2e-basic"
    assert made["token"] == hashlib.sha256(key.encode()).hexdigest()

    answer = call(proxy, "POST", "/v1/keyed/basic?x=1", key=key, body={"hello": "world"})
    assert answer.status == 200, answer
    assert answer.headers.get("x-litellm-call-id")
    # The other carrier LiteLLM clients use.
    assert call(proxy, "GET", "/v1/keyed/basic", headers={"x-litellm-api-key": key}).status == 200
    assert call(proxy, "PUT", "/v1/keyed/basic", key=MASTER_KEY, body=b"m").status == 200
    seen = upstream_paths(up, "/k/basic")
    assert [r.method for r in seen] == ["POST", "GET", "PUT"]
    for request in seen:
        values = " ".join(v for _, v in request.headers)
        assert key not in values and MASTER_KEY not in values, request.headers

    # No key, a wrong key, and a virtual key on the admin API.
    assert call(proxy, "GET", "/v1/keyed/basic").status == 401
    assert admin(proxy, "POST", "/key/generate", {}, key=key).status == 403
    assert call(proxy, "POST", "/key/generate", body={}).status == 401
    assert len(upstream_paths(up, "/k/basic")) == 3


def test_unknown_blocked_and_expired_keys_are_401(proxy, up):
    unknown = call(proxy, "GET", "/v1/keyed/refused", key="sk-not-a-key-0000000000000000000000000")
    assert unknown.status == 401, unknown
    assert unknown.json()["error"]["code"] == "401"

    blocked = generate(proxy, key_alias="e2e-blocked", blocked=True)
    answer = call(proxy, "GET", "/v1/keyed/refused", key=blocked["key"])
    assert answer.status == 401 and "blocked" in answer.json()["error"]["message"].lower(), answer

    short = generate(proxy, key_alias="e2e-expires", duration="1s")
    assert short["expires"]
    time.sleep(1.2)
    expired = call(proxy, "GET", "/v1/keyed/refused", key=short["key"])
    assert expired.status == 401 and "expired" in expired.json()["error"]["message"].lower(), expired
    assert upstream_paths(up, "/k/refused") == []


def test_allowed_routes_and_their_subpaths(proxy, up):
    key = generate(proxy, key_alias="e2e-routes", allowed_routes=["/v1/keyed"])["key"]
    assert call(proxy, "GET", "/v1/keyed", key=key).status == 200
    assert call(proxy, "GET", "/v1/keyed/sub/path", key=key).status == 200
    outside = call(proxy, "GET", "/v1/other", key=key)
    assert outside.status == 403, outside
    assert upstream_paths(up, "/o") == []
    assert len(upstream_paths(up, "/k/sub/path")) == 1

    # LiteLLM's other name for the field.
    other = generate(proxy, key_alias="e2e-routes-2", allowed_passthrough_routes=["/v1/other"])["key"]
    assert call(proxy, "GET", "/v1/other", key=other).status == 200
    assert call(proxy, "GET", "/v1/keyed/x", key=other).status == 403


def test_budget_exceeded_once_spend_reaches_max_budget(proxy, up):
    made = generate(proxy, key_alias="e2e-budget", max_budget=1.0)
    key = made["key"]
    for _ in range(4):  # 4 x 0.25 = the budget; spend before each is below it
        answer = call(proxy, "GET", "/v1/paid/budget", key=key)
        assert answer.status == 200, answer
    # Spend is added by the usage writer, off the request path: wait for the refusal.
    extra = 0
    deadline = time.monotonic() + 15
    refusal = None
    while time.monotonic() < deadline:
        answer = call(proxy, "GET", "/v1/paid/budget", key=key)
        if answer.status == 400:
            refusal = answer
            break
        assert answer.status == 200, answer
        extra += 1
        time.sleep(0.3)
    assert refusal is not None, "no budget_exceeded within 15 s"
    error = refusal.json()["error"]
    assert error["type"] == "budget_exceeded" and error["code"] == "400", error
    # Every worker refuses it once its view of the spend is fresh (bounded).
    wait_until(lambda: all(call(proxy, "GET", "/v1/paid/budget", key=key).status == 400 for _ in range(9)), 10, "all workers refuse")
    info = admin(proxy, "GET", f"/key/info?key={made['token']}")
    assert info.status == 200, info
    upstream_count = len(upstream_paths(up, "/p/budget"))
    # Spend stops growing with the refusals: only the answered calls cost.
    wait_until(lambda: admin(proxy, "GET", f"/key/info?key={made['token']}").json()["info"]["spend"] == upstream_count * COST, 10, "spend")
    print(f"budget: {extra} calls admitted after the budget was reached (spend visible late)")


def test_rpm_limit_admits_exactly_the_limit_under_a_concurrent_burst(proxy, up):
    limit, callers = 5, 20
    key = generate(proxy, key_alias="e2e-rpm", rpm_limit=limit)["key"]
    answers = concurrently(callers, lambda i: call(proxy, "GET", "/v1/keyed/rpm", key=key))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * limit + [429] * (callers - limit), answers
    assert len(upstream_paths(up, "/k/rpm")) == limit
    for answer in answers:
        if answer.status == 429:
            assert int(answer.headers["retry-after"]) >= 1, answer.headers
            assert answer.json()["error"]["code"] == "429"
        else:
            assert answer.headers["x-ratelimit-limit-requests"] == str(limit)
            assert answer.headers["x-ratelimit-reset-requests"]
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status == 200)
    assert remaining == list(range(limit)), remaining
    later = call(proxy, "GET", "/v1/keyed/rpm", key=key)
    assert later.status == 429 and 1 <= int(later.headers["retry-after"]) <= 60, later.headers
    assert len(upstream_paths(up, "/k/rpm")) == limit


def test_peak_concurrency_at_a_slow_upstream_equals_max_parallel_requests(proxy, up):
    limit = 2
    handler = up.route("/k/peak", held(0.4))
    key = generate(proxy, key_alias="e2e-parallel", max_parallel_requests=limit)["key"]
    deadline = time.monotonic() + 3.0

    def caller(i):
        statuses = []
        while time.monotonic() < deadline and len(statuses) < 200:
            answer = call(proxy, "GET", "/v1/keyed/peak", key=key)
            statuses.append(answer.status)
            if answer.status == 429:
                assert answer.headers["retry-after"] == "1", answer.headers
                time.sleep(0.05)
        return statuses

    results = concurrently(8, caller)
    statuses = [s for r in results for s in r]
    assert set(statuses) <= {200, 429}, results
    assert handler.peak == limit, f"peak {handler.peak}, limit {limit}"
    assert statuses.count(200) == handler.count
    assert statuses.count(429) > 0


def test_slot_comes_back_when_the_caller_aborts_a_stream(proxy, up):
    events = [b"data: %d\n\n" % i for i in range(100)]
    up.route("/k/sse-abort", sse(events, interval=0.2))
    key = generate(proxy, key_alias="e2e-abort", max_parallel_requests=1)["key"]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(b"GET /v1/keyed/sse-abort HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n")
        received = b""
        deadline = time.monotonic() + 10
        while b"data: 1\n" not in received and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        assert b" 200 " in received.split(b"\r\n", 1)[0] and b"data: 1\n" in received, received[:300]
        busy = call(proxy, "GET", "/v1/keyed/quick", key=key)
        assert busy.status == 429 and busy.headers["retry-after"] == "1", busy
    finally:
        sock.close()
    left = time.monotonic()
    admitted = wait_until(lambda: call(proxy, "GET", "/v1/keyed/quick", key=key).status == 200 and time.monotonic(), 5, "the slot")
    assert admitted - left <= 2.0, f"slot back {admitted - left:.2f}s after the caller left"
    assert len(upstream_paths(up, "/k/quick")) == 1


def test_revocation_reaches_every_worker_within_2_seconds(proxy, up):
    blocked = generate(proxy, key_alias="e2e-rev-block")["key"]
    deleted = generate(proxy, key_alias="e2e-rev-delete")["key"]
    updated = generate(proxy, key_alias="e2e-rev-update")["key"]
    for key in (blocked, deleted, updated):  # every worker has seen (and cached) every key
        for answers in cover_workers(proxy, key, "/v1/keyed/rev").values():
            assert {a.status for a in answers} == {200}, answers

    assert admin(proxy, "POST", "/key/block", {"key": blocked}).status == 200
    deletion = admin(proxy, "POST", "/key/delete", {"keys": [deleted]})
    assert deletion.status == 200 and len(deletion.json()["deleted_keys"]) == 1, deletion
    assert admin(proxy, "POST", "/key/update", {"key": updated, "allowed_routes": ["/v1/other"]}).status == 200
    time.sleep(REVOCATION_SECONDS)
    for key, status, word in ((blocked, 401, "blocked"), (deleted, 401, ""), (updated, 403, "")):
        for pid, answers in cover_workers(proxy, key, "/v1/keyed/rev").items():
            for answer in answers:
                assert answer.status == status and word in answer.json()["error"]["message"].lower(), (pid, answer)

    assert admin(proxy, "POST", "/key/unblock", {"key": blocked}).status == 200
    time.sleep(REVOCATION_SECONDS)
    for pid, answers in cover_workers(proxy, blocked, "/v1/keyed/rev").items():
        assert {a.status for a in answers} == {200}, (pid, answers)


def test_usage_rows_are_in_spend_logs_with_the_call_id(proxy, up):
    up.route("/p/priced", fixed(200, [("Content-Type", "application/json"), ("x-litellm-response-cost", "0.125")], b'{"ok":true}'))
    up.route("/p/badly-priced", fixed(200, [("Content-Type", "application/json"), ("x-litellm-response-cost", "-3")], b'{"ok":1}'))
    made = generate(proxy, key_alias="e2e-usage")
    key, token = made["key"], made["token"]
    body = b'{"input":"abc"}'
    answers = {
        "plain": call(proxy, "POST", "/v1/paid/plain", key=key, body=body, headers={"Content-Type": "application/json"}),
        "priced": call(proxy, "POST", "/v1/paid/priced", key=key, body=body),
        "badly": call(proxy, "POST", "/v1/paid/badly-priced", key=key, body=body),
        "master": call(proxy, "GET", "/v1/paid/plain", key=MASTER_KEY),
        "open": call(proxy, "GET", "/open"),
    }
    assert {name: a.status for name, a in answers.items()} == dict.fromkeys(answers, 200), answers
    ids = {name: a.headers["x-litellm-call-id"] for name, a in answers.items()}

    rows = {row["request_id"]: row for row in wait_rows(proxy, {ids["plain"], ids["priced"], ids["badly"]}, api_key=token)}
    fields = {"request_id", "api_key", "key_alias", "route", "method", "status", "request_bytes", "response_bytes"}
    fields |= {"duration_ms", "ttfb_ms", "spend", "startTime", "endTime", "upstream_error"}
    for name, spend in (("plain", COST), ("priced", 0.125), ("badly", COST)):
        row = rows[ids[name]]
        assert fields <= set(row), f"missing {fields - set(row)} in {row}"
        assert row["api_key"] == token and row["key_alias"] == "e2e-usage", row
        assert row["route"] == "/v1/paid" and row["method"] == "POST" and row["status"] == 200, row
        assert row["request_bytes"] == len(body) and row["response_bytes"] == len(answers[name].body), row
        assert row["duration_ms"] >= row["ttfb_ms"] >= 0 and row["upstream_error"] is None, row
        assert row["spend"] == spend, (name, row)
        assert row["startTime"] and row["endTime"] and not_after(row["startTime"], row["endTime"]), row
    # The same rows by key (plaintext) and by alias; never the plaintext anywhere.
    assert {r["request_id"] for r in spend_rows(proxy, api_key=key)} == set(rows)
    assert {r["request_id"] for r in spend_rows(proxy, key_alias="e2e-usage")} == set(rows)
    everything = wait_rows(proxy, {ids["master"], ids["open"]})
    by_id = {row["request_id"]: row for row in everything}
    assert by_id[ids["master"]]["api_key"] == "master" and by_id[ids["open"]]["api_key"] is None, everything
    assert key not in json.dumps(spend_rows(proxy))
    info = admin(proxy, "GET", f"/key/info?key={token}").json()
    assert info["info"]["spend"] == COST + 0.125 + COST, info


def test_no_usage_row_lost_across_hup_under_load(proxy, up):
    made = generate(proxy, key_alias="e2e-hup")
    key, token = made["key"], made["token"]
    stop = threading.Event()
    answered: list[str] = []
    failures: list = []

    def load():
        deadline = time.monotonic() + 30
        for _ in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                answer = call(proxy, "GET", "/v1/keyed/hup", key=key, timeout=10)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if "x-litellm-call-id" in answer.headers:
                answered.append(answer.headers["x-litellm-call-id"])
            if answer.status != 200:
                failures.append(answer)

    def more_answers(count: int, what: str) -> None:
        target = len(answered) + count
        wait_until(lambda: len(answered) >= target, 15, what)

    loops = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for loop in loops:
        loop.start()
    try:
        for round_ in range(2):
            before = set(proxy.worker_pids())
            more_answers(30, f"load before HUP {round_ + 1}")
            os.kill(proxy.proc.pid, signal.SIGHUP)
            wait_until(lambda b=before: len(set(proxy.worker_pids()) - b) == WORKERS, 20, "new workers after HUP")
        more_answers(30, "load after the HUPs")
    finally:
        stop.set()
        for loop in loops:
            loop.join(timeout=20)
    assert not any(loop.is_alive() for loop in loops)
    assert len(set(answered)) == len(answered) >= 90
    rows = wait_rows(proxy, set(answered), api_key=token)
    assert len(rows) == len(answered), f"{len(rows)} rows for {len(answered)} answered requests"
    assert failures == [], failures[:5]

    samples = metrics_of(proxy)
    assert samples["proxy_usage_rows_written_total"] >= len(answered), samples.get("proxy_usage_rows_written_total")
    assert samples["proxy_usage_rows_dropped_total"] == 0
    print(f"HUP x2 under load: {len(answered)} answered, {len(rows)} usage rows")


def test_slot_comes_back_after_the_worker_holding_it_is_killed(proxy, up):
    up.route("/k/hold", stall(KILL_SECONDS + 30))
    key = generate(proxy, key_alias="e2e-kill", max_parallel_requests=1)["key"]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(b"GET /v1/keyed/hold HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n")
        wait_until(lambda: upstream_paths(up, "/k/hold"), 10, "the held request upstream")
        holder = wait_until(lambda: serving_pid(proxy, sock), 5, "the worker holding the slot")
        busy = call(proxy, "GET", "/v1/keyed/quick-kill", key=key)
        assert busy.status == 429, busy
        os.kill(holder, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        sock.close()
    wait_until(lambda: holder not in proxy.worker_pids(), 10, "the killed worker to be gone")
    deadline = killed + KILL_SECONDS
    answer = None
    while time.monotonic() < deadline:
        answer = call(proxy, "GET", "/v1/keyed/quick-kill", key=key)
        if answer.status == 200:
            break
        assert answer.status == 429, answer
        time.sleep(1.0)
    assert answer is not None and answer.status == 200, f"slot not back {KILL_SECONDS}s after SIGKILL: {answer}"
    print(f"slot back {time.monotonic() - killed:.1f}s after SIGKILL of worker {holder}")


def test_the_log_has_no_traceback_and_no_plaintext_key(proxy):
    log = proxy.log()
    assert "Traceback" not in log, log[-3000:]
    assert not re.search(r"sk-[A-Za-z0-9_-]{40,}", log), "a plaintext key in the log"
