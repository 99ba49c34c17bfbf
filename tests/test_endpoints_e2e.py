"""The endpoint API (``/config/pass_through_endpoint``) end to end: gunicorn, 3 workers, embedded SQLite.

Endpoints are created, changed and deleted through the admin API with the master key, and
the proof is what the callers got, what the recording upstream (tests/upstream.py) saw and
what the SQLite file holds. "Every worker" is checked, not hoped for: the worker that served a
connection is read from the kernel (tests/test_keys_e2e.py :func:`serving_pid`), and a change
must be served by each of the three workers within 2 s of the admin call's answer, with no
restart and no failed request meanwhile.

The cluster variant (two instances on one PostgreSQL) is tests/test_endpoints_cluster.py,
which reuses the helpers here.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import config_for
from tests.gunicorn_proc import Gunicorn
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.test_keys_e2e import Answer
from tests.test_keys_e2e import admin
from tests.test_keys_e2e import call
from tests.test_keys_e2e import cover_workers
from tests.test_keys_e2e import instance_env
from tests.test_keys_e2e import serving_pid
from tests.upstream import Upstream
from tests.upstream import sse

WORKERS = 3
THREADS = 8
API = "/config/pass_through_endpoint"
CHANGE_SECONDS = 2.0  # a create, update or delete is served by every worker within this
SALT_KEY = "e2e-salt-key-not-a-real-one"
TOKEN = "env-token-value-7f3a91"  # UPSTREAM_TOKEN: reached through os.environ/UPSTREAM_TOKEN
LITERAL = "literal-header-secret-5c2e8d"  # a literal header value: stored sealed, never shown


# -- helpers (shared with tests/test_endpoints_cluster.py) ------------------------------------


def create(server: Gunicorn, **fields) -> dict:
    """POST /config/pass_through_endpoint with the master key; the endpoint it answers."""
    answer = admin(server, "POST", API, fields)
    assert answer.status == 200, answer
    made = answer.json()
    assert made["id"] and made["is_from_config"] is False, made
    return made


def update(server: Gunicorn, endpoint_id: str, **fields) -> dict:
    answer = admin(server, "POST", f"{API}/{endpoint_id}", fields)
    assert answer.status == 200, answer
    return answer.json()


def delete(server: Gunicorn, endpoint_id: str) -> dict:
    answer = admin(server, "DELETE", f"{API}?endpoint_id={endpoint_id}")
    assert answer.status == 200, answer
    return answer.json()


def listed(server: Gunicorn, endpoint_id: str | None = None) -> list[dict]:
    query = f"?endpoint_id={endpoint_id}" if endpoint_id else ""
    answer = admin(server, "GET", API + query)
    assert answer.status == 200, answer
    return answer.json()["endpoints"]


def error_message(answer: Answer) -> str:
    return answer.json()["error"]["message"]


def target_of(answer: Answer) -> str | None:
    """The request target the upstream's default handler (echo_json) says it received."""
    if answer.status != 200:
        return None
    try:
        return answer.json().get("target")
    except ValueError:
        return None


def converge(
    server: Gunicorn,
    path: str,
    is_new,
    since: float,
    settle: float = CHANGE_SECONDS,
    max_requests: int = 600,
    max_seconds: float = 20.0,
) -> dict[int, list[tuple[float, Answer]]]:
    """Call ``path`` on fresh connections from now until every worker answered at or after
    ``since + settle``; every answer from then on must satisfy ``is_new``, and a worker that
    served the new version once never goes back to the old one.

    :returns: (seconds after ``since``, answer) by worker pid.
    """
    workers = set(server.worker_pids())
    seen: dict[int, list[tuple[float, Answer]]] = {}
    late: set[int] = set()
    deadline = time.monotonic() + max_seconds
    for _ in range(max_requests):
        if workers <= late or time.monotonic() > deadline:
            break
        sent = time.monotonic()
        answer = call(server, "GET", path, want_pid=True)
        if answer.pid is None:
            continue
        seen.setdefault(answer.pid, []).append((sent - since, answer))
        if sent >= since + settle:
            late.add(answer.pid)
        else:
            time.sleep(0.01)  # before the settle time, sample rather than flood
    assert workers <= late, f"workers {sorted(workers)} not all reached after {settle}s in {max_requests} requests: {sorted(late)}"
    stale = [(pid, round(t, 2), a) for pid, got in seen.items() for t, a in got if t >= settle and not is_new(a)]
    assert stale == [], f"{path}: old version served {settle}s after the change: {stale[:5]}"
    for pid, got in seen.items():
        flags = [is_new(a) for _, a in got]
        if True in flags:
            assert all(flags[flags.index(True) :]), f"{path}: worker {pid} went back to the old version: {got}"
    return seen


def first_new(seen: dict[int, list[tuple[float, Answer]]], is_new) -> float:
    """The latest, over the workers, of each one's first new answer (seconds after the change)."""
    return max(min((t for t, a in got if is_new(a)), default=float("inf")) for got in seen.values())


def errors_by_pid(log: str, *patterns: str) -> dict[int, int]:
    """ERROR lines matching every one of ``patterns`` per process, from gunicorn's log."""
    counts: dict[int, int] = {}
    for match in re.finditer(r"^\S+ \S+ \[(\d+)\] ERROR (.*)$", log, re.MULTILINE):
        if all(re.search(p, match.group(2)) for p in patterns):
            counts[int(match.group(1))] = counts.get(int(match.group(1)), 0) + 1
    return counts


def on_every_worker(server: Gunicorn, path: str) -> dict[int, list[Answer]]:
    """Call ``path`` (no key) on fresh connections until every worker answered at least once (bounded)."""
    return cover_workers(server, None, path)


def recorded(up: Upstream, path: str) -> list:
    return [r for r in up.requests if r.path == path]


def config_endpoints(upstream_url: str) -> list[dict]:
    return [
        {"path": "/cfg", "target": upstream_url + "/cfg"},  # config-0
        {"path": "/cfg-sub", "target": upstream_url + "/cfg-sub", "include_subpath": True, "methods": ["GET"]},  # config-1
    ]


def instance_files(state_dir: Path) -> bytes:
    """Every byte of the SQLite database and its side files (WAL, shared memory, journal)."""
    found = b""
    for name in ("proxy_app.db", "proxy_app.db-wal", "proxy_app.db-shm", "proxy_app.db-journal"):
        path = state_dir / name
        if path.exists():
            found += path.read_bytes()
    return found


def stored_rows(state_dir: Path) -> dict[str, tuple[dict, str | None]]:
    """id -> (entry, sealed) as the SQLite file holds them (read-only, beside the running proxy)."""
    db = sqlite3.connect(f"file:{state_dir / 'proxy_app.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT id, entry, sealed FROM proxy_endpoints").fetchall()
    finally:
        db.close()
    return {row[0]: (json.loads(row[1]) if isinstance(row[1], str) else row[1], row[2]) for row in rows}


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def up():
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("endpoints-e2e") / "state"


@pytest.fixture(scope="module")
def proxy(up, state_dir):
    base = state_dir.parent
    config = write_config(base, config_for(*config_endpoints(up.url)))
    env = instance_env(state_dir, LITELLM_SALT_KEY=SALT_KEY, UPSTREAM_TOKEN=TOKEN)
    env.pop("NOT_SET_HERE", None)
    with run_gunicorn(config, env, workers=WORKERS, threads=THREADS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        yield server


# -- 1. create, update, delete reach every worker -----------------------------------------------


def test_create_update_delete_reach_every_worker_within_2_seconds(proxy, up):
    assert call(proxy, "GET", "/e2e/life").status == 404
    made = create(
        proxy,
        path="/e2e/life",
        target=up.url + "/life/v1",
        headers={"X-Literal": LITERAL, "X-Env-Token": "os.environ/UPSTREAM_TOKEN"},
    )
    since = time.monotonic()
    endpoint_id = made["id"]
    assert made["path"] == "/e2e/life" and made["headers"] == {"X-Literal": "<redacted>", "X-Env-Token": "os.environ/UPSTREAM_TOKEN"}, made

    seen = converge(proxy, "/e2e/life", lambda a: target_of(a) == "/life/v1", since)
    print(f"create served by every worker {first_new(seen, lambda a: a.status == 200):.2f}s after the answer")
    # The upstream got both injected values on every request that reached it.
    reached = recorded(up, "/life/v1")
    assert reached and len(reached) == sum(1 for got in seen.values() for _, a in got if a.status == 200)
    for request in reached:
        assert request.header("X-Literal") == LITERAL and request.header("X-Env-Token") == TOKEN, request.headers

    # Update: another target path and another literal value.
    changed = update(proxy, endpoint_id, target=up.url + "/life/v2", headers={"X-Literal": LITERAL + "-v2", "X-Env-Token": "<redacted>"})
    since = time.monotonic()
    assert changed["target"] == up.url + "/life/v2" and changed["headers"]["X-Env-Token"] == "os.environ/UPSTREAM_TOKEN", changed
    seen = converge(proxy, "/e2e/life", lambda a: target_of(a) == "/life/v2", since)
    print(f"update served by every worker {first_new(seen, lambda a: target_of(a) == '/life/v2'):.2f}s after the answer")
    reached = recorded(up, "/life/v2")
    assert reached
    for request in reached:
        assert request.header("X-Literal") == LITERAL + "-v2" and request.header("X-Env-Token") == TOKEN, request.headers
    [shown] = listed(proxy, endpoint_id)
    assert shown["target"] == up.url + "/life/v2" and shown["is_from_config"] is False, shown

    # Delete: the answer is the deleted endpoint; 404 on every worker within 2 s.
    gone = delete(proxy, endpoint_id)
    since = time.monotonic()
    assert [e["id"] for e in gone["endpoints"]] == [endpoint_id], gone
    before = len(up.requests)
    seen = converge(proxy, "/e2e/life", lambda a: a.status == 404, since)
    print(f"delete served by every worker {first_new(seen, lambda a: a.status == 404):.2f}s after the answer")
    late = [r for r in up.requests[before:] if r.path.startswith("/life/")]
    assert len(late) == sum(1 for got in seen.values() for _, a in got if a.status == 200)
    assert admin(proxy, "GET", f"{API}?endpoint_id={endpoint_id}").status == 404
    assert admin(proxy, "DELETE", f"{API}?endpoint_id={endpoint_id}").status == 404

    log = proxy.log()
    assert f"admin: endpoint /e2e/life (id {endpoint_id}) created by POST {API}" in log
    assert re.search(rf"admin: endpoint /e2e/life \(id {endpoint_id}\) updated \(headers, target\) by POST {API}/{endpoint_id}", log), log[
        -3000:
    ]
    assert f"admin: endpoint /e2e/life (id {endpoint_id}) deleted by DELETE {API}" in log


# -- 2. no request fails while endpoints change ------------------------------------------------------


def test_no_request_fails_while_endpoints_change(proxy, up):
    made = create(proxy, path="/e2e/busy", target=up.url + "/busy/0", headers={"X-Literal": LITERAL})
    since = time.monotonic()
    converge(proxy, "/e2e/busy", lambda a: target_of(a) == "/busy/0", since)
    stop = threading.Event()
    answers: dict[str, list] = {"/cfg": [], "/e2e/busy": []}

    def load(path: str):
        # Bounded, and long enough to outlast the changes below on a slow machine (they end
        # the loops through ``stop`` once enough requests ran after the last change).
        deadline = time.monotonic() + 90
        for _ in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                answers[path].append(call(proxy, "GET", path, timeout=10))
            except OSError as exc:
                answers[path].append(exc)

    loops = [threading.Thread(target=load, args=(path,), daemon=True) for path in answers for _ in range(3)]
    for loop in loops:
        loop.start()
    versions = []
    try:
        wait_until(lambda: all(len(v) >= 10 for v in answers.values()), 15, "load on both endpoints")
        for version in range(1, 7):
            # Each update keeps the endpoint valid: another target, another literal value.
            update(proxy, made["id"], target=up.url + f"/busy/{version}", headers={"X-Literal": f"{LITERAL}-{version}"})
            versions.append(version)
            # An unrelated create and delete rebuild every worker's table once more.
            other = create(proxy, path=f"/e2e/churn-{version}", target=up.url + "/churn")
            delete(proxy, other["id"])
            time.sleep(0.4)
        count = sum(len(v) for v in answers.values())
        wait_until(lambda: sum(len(v) for v in answers.values()) >= count + 30, 15, "load after the changes")
    finally:
        stop.set()
        for loop in loops:
            loop.join(timeout=20)
    assert not any(loop.is_alive() for loop in loops)
    for path, got in answers.items():
        failed = [a for a in got if not isinstance(a, Answer) or a.status != 200]
        assert failed == [], f"{len(failed)} of {len(got)} requests to {path} failed: {failed[:5]}"
        assert len(got) >= 40, (path, len(got))
    # Every request on the stored endpoint reached one of its versions with that version's value.
    busy = [r for r in up.requests if r.path.startswith("/busy/")]
    for request in busy:
        version = int(request.path.rsplit("/", 1)[1])
        assert request.header("X-Literal") == (LITERAL if version == 0 else f"{LITERAL}-{version}"), (request.path, request.headers)
    assert {int(r.path.rsplit("/", 1)[1]) for r in busy} >= {0, 6}
    print(f"{sum(len(v) for v in answers.values())} requests, {len(versions)} updates, none failed")
    delete(proxy, made["id"])


# -- 3. a request in flight finishes as it began ------------------------------------------------------


def test_streaming_request_on_a_deleted_endpoint_completes(proxy, up):
    events = [b"data: %d %s\n\n" % (i, b"x" * 64) for i in range(10)]
    handler = up.route("/slow/stream", sse(events, interval=0.2))  # about 2 s
    made = create(proxy, path="/e2e/slow", target=up.url + "/slow/stream")
    time.sleep(CHANGE_SECONDS)  # every worker serves it

    streams = 4  # several, so that the worker that serves the DELETE likely holds one too
    results: list = [None] * streams
    pids: list = [None] * streams

    def stream(i):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
        try:
            conn.request("GET", "/e2e/slow")
            response = conn.getresponse()
            pids[i] = serving_pid(proxy, conn.sock)
            results[i] = (response.status, response.read())
        except Exception as exc:  # noqa: BLE001 - reported as the result
            results[i] = exc
        finally:
            conn.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(recorded(up, "/slow/stream")) >= streams, 10, "the streams upstream")
    time.sleep(0.3)  # a chunk or two has gone out
    gone = delete(proxy, made["id"])
    deleted_at = time.monotonic()
    assert gone["endpoints"][0]["id"] == made["id"]
    assert len(handler.sent_at) < len(events), "the stream ended before the delete: the test proves nothing"
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads)
    for result in results:
        assert not isinstance(result, BaseException), results
        status, body = result
        assert status == 200 and body == b"".join(events), (status, body[-200:])
    print(f"{streams} streams on workers {sorted(set(p for p in pids if p))} completed across the delete")
    # A new request afterwards is 404 on every worker.
    converge(proxy, "/e2e/slow", lambda a: a.status == 404, deleted_at)
    assert len(recorded(up, "/slow/stream")) == streams


# -- 4. a literal value is never stored, shown nor logged in clear ---------------------------------------


def test_literal_header_value_is_never_in_the_database_answers_or_log(proxy, up, state_dir):
    secret = "sealed-only-value-" + "9d41c7ab03"
    answers = []
    body = {
        "id": "e2e-secret",
        "path": "/e2e/secret",
        "target": up.url + "/secret",
        "headers": {"X-Literal": secret, "X-Env-Token": "os.environ/UPSTREAM_TOKEN"},
    }
    create_answer = admin(proxy, "POST", API, body)
    answers.append(create_answer)
    assert create_answer.status == 200, create_answer
    # The same id and body again: a no-op, answered with the endpoint.
    again = admin(proxy, "POST", API, body)
    answers.append(again)
    assert again.status == 200 and again.json()["id"] == "e2e-secret", again
    answers.append(admin(proxy, "GET", API))
    answers.append(admin(proxy, "GET", f"{API}?endpoint_id=e2e-secret"))
    [shown] = answers[-1].json()["endpoints"]
    assert shown["headers"] == {"X-Literal": "<redacted>", "X-Env-Token": "os.environ/UPSTREAM_TOKEN"}, shown
    time.sleep(CHANGE_SECONDS)
    for pid, got in on_every_worker(proxy, "/e2e/secret").items():
        assert {a.status for a in got} == {200}, (pid, got)
        answers += got
    for request in recorded(up, "/secret"):
        assert request.header("X-Literal") == secret and request.header("X-Env-Token") == TOKEN

    # What the store holds: the entry with the placeholder, the value sealed.
    entry, sealed = stored_rows(state_dir)["e2e-secret"]
    assert entry["headers"] == {"X-Literal": "<redacted>", "X-Env-Token": "os.environ/UPSTREAM_TOKEN"}, entry
    assert sealed and secret not in sealed
    # A retried create changed nothing: one "created" line.
    assert proxy.log().count("(id e2e-secret) created") == 1

    # Another value through an update, then the delete: neither value ever in clear.
    newer = secret + "-rotated"
    answers.append(admin(proxy, "POST", f"{API}/e2e-secret", {"headers": {"X-Literal": newer, "X-Env-Token": "<redacted>"}}))
    assert answers[-1].status == 200, answers[-1]
    answers.append(admin(proxy, "GET", f"{API}?endpoint_id=e2e-secret"))
    assert answers[-1].json()["endpoints"][0]["headers"] == shown["headers"]
    time.sleep(CHANGE_SECONDS)
    assert call(proxy, "GET", "/e2e/secret").status == 200
    assert recorded(up, "/secret")[-1].header("X-Literal") == newer
    answers.append(admin(proxy, "DELETE", f"{API}?endpoint_id=e2e-secret"))
    assert answers[-1].status == 200, answers[-1]

    stored = instance_files(state_dir)
    assert stored, "no SQLite file in the state directory"
    for value in (secret, newer, TOKEN):
        assert value.encode() not in stored, f"{value!r} in clear in the SQLite files"
        for answer in answers:
            assert value.encode() not in answer.body and value not in json.dumps(answer.headers), answer
        assert value not in proxy.log(), f"{value!r} in the gunicorn log"


# -- 5. config-file endpoints are the file's -------------------------------------------------------------


def test_config_file_endpoints_are_listed_and_cannot_be_changed_here(proxy, up):
    everything = listed(proxy)
    config = {e["id"]: e for e in everything if e["is_from_config"]}
    assert set(config) == {"config-0", "config-1"}, everything
    assert config["config-0"]["path"] == "/cfg" and config["config-1"]["methods"] == ["GET"], config
    assert config["config-1"]["include_subpath"] is True

    # The path and a method the file serves: 409 naming the file's endpoint.
    clash = admin(proxy, "POST", API, {"path": "/cfg", "target": up.url + "/x"})
    assert clash.status == 409 and "config-0" in error_message(clash), clash
    clash = admin(proxy, "POST", API, {"path": "/cfg-sub", "target": up.url + "/x", "methods": ["GET", "POST"]})
    assert clash.status == 409 and "config-1" in error_message(clash), clash
    # Another method on a file's path is free.
    beside = create(proxy, path="/cfg-sub", target=up.url + "/beside", methods=["POST"])
    # A null resets a field to its default: all methods would take the file's GET (409); a
    # timeout reset is fine, and GET lists the default again.
    widened = admin(proxy, "POST", f"{API}/{beside['id']}", {"methods": None})
    assert widened.status == 409 and "config-1" in error_message(widened), widened
    timed = update(proxy, beside["id"], timeout=5)
    assert timed["timeout"] == 5.0, timed
    reset = update(proxy, beside["id"], timeout=None)
    assert reset["timeout"] != 5.0 and reset["timeout"] == listed(proxy, beside["id"])[0]["timeout"] and reset["methods"] == ["POST"], reset
    # Another stored endpoint's path and method: 409 too.
    clash = admin(proxy, "POST", API, {"path": "/cfg-sub", "target": up.url + "/x", "methods": ["POST"]})
    assert clash.status == 409 and beside["id"] in error_message(clash), clash

    for method, path, body in (
        ("POST", f"{API}/config-0", {"target": up.url + "/elsewhere"}),
        ("DELETE", f"{API}?endpoint_id=config-0", None),
        ("DELETE", f"{API}?endpoint_id=config-1", None),
    ):
        answer = admin(proxy, method, path, body)
        assert answer.status == 409, (method, path, answer)
        message = error_message(answer).lower()
        assert "config file" in message and "edit" in message and "reload" in message, answer
    # Bad input names the field; no key, 401.
    bad = admin(proxy, "POST", API, {"path": "/e2e/bad", "target": up.url + "/x", "timeout": "soon"})
    assert bad.status == 400 and "timeout" in error_message(bad), bad
    assert admin(proxy, "POST", API, {"path": "/e2e/bad"}).status == 400
    assert call(proxy, "GET", API).status == 401
    assert call(proxy, "POST", API, body={"path": "/e2e/nokey", "target": up.url + "/x"}).status == 401

    time.sleep(CHANGE_SECONDS)
    # The file's endpoint still served as it was; the stored one beside it too.
    assert target_of(call(proxy, "GET", "/cfg")) == "/cfg"
    assert target_of(call(proxy, "GET", "/cfg-sub/a")) == "/cfg-sub/a"
    assert target_of(call(proxy, "POST", "/cfg-sub", body=b"x")) == "/beside"
    # Neither refused create stored anything.
    assert [e["id"] for e in listed(proxy) if e["path"] in ("/e2e/bad", "/e2e/nokey")] == []
    delete(proxy, beside["id"])


# -- 7. a variable this instance lacks --------------------------------------------------------------------


def test_missing_variable_answers_503_and_logs_an_error(proxy, up):
    assert "NOT_SET_HERE" not in os.environ
    other = create(proxy, path="/e2e/fine", target=up.url + "/fine")
    made = create(proxy, path="/e2e/unset", target=up.url + "/unset", headers={"X-Token": "os.environ/NOT_SET_HERE"})
    since = time.monotonic()
    assert made["headers"] == {"X-Token": "os.environ/NOT_SET_HERE"}, made

    seen = converge(proxy, "/e2e/unset", lambda a: a.status == 503, since)
    for got in seen.values():
        for _, answer in got:
            assert answer.status in (404, 503), answer
            if answer.status == 503:
                message = error_message(answer)
                assert "NOT_SET_HERE" in message and answer.json()["error"]["code"] == "503", answer
    assert recorded(up, "/unset") == []
    # The workers keep serving the rest: the file's endpoint and another stored one.
    for path, target in (("/cfg", "/cfg"), ("/e2e/fine", "/fine")):
        for pid, got in on_every_worker(proxy, path).items():
            assert {target_of(a) for a in got} == {target}, (path, pid, got)

    errors = errors_by_pid(proxy.log(), re.escape(made["id"]), "NOT_SET_HERE")
    assert errors, f"no ERROR line naming {made['id']} and NOT_SET_HERE:\n{proxy.log()[-3000:]}"
    assert set(errors) <= set(proxy.worker_pids()) | {proxy.proc.pid}, errors
    delete(proxy, made["id"])
    delete(proxy, other["id"])


def test_the_log_has_no_traceback(proxy):
    log = proxy.log()
    assert "Traceback" not in log, log[-3000:]


# -- 6. stored endpoints survive a HUP and a restart ---------------------------------------------------------


def test_stored_endpoints_survive_hup_and_restart(up, tmp_path):
    state = tmp_path / "state"
    env = instance_env(state, LITELLM_SALT_KEY=SALT_KEY, UPSTREAM_TOKEN=TOKEN)
    config_path = write_config(tmp_path, config_for(*config_endpoints(up.url)))
    headers = {"X-Literal": LITERAL, "X-Env-Token": "os.environ/UPSTREAM_TOKEN"}

    def served_everywhere(server, path, target):
        for pid, got in on_every_worker(server, path).items():
            assert {target_of(a) for a in got} == {target}, (path, pid, got)

    with run_gunicorn(config_path, env, workers=WORKERS, threads=THREADS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        made = create(server, id="kept", path="/e2e/kept", target=up.url + "/kept", headers=headers)
        time.sleep(CHANGE_SECONDS)
        served_everywhere(server, "/e2e/kept", "/kept")

        # A config-file endpoint added, then HUP: the file is read again, the stored one kept.
        write_config(tmp_path, config_for(*config_endpoints(up.url), {"path": "/cfg-added", "target": up.url + "/added"}))
        before = set(server.worker_pids())
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(
            lambda: len(set(server.worker_pids()) - before) == WORKERS and not set(server.worker_pids()) & before,
            30,
            "new workers after HUP",
        )
        served_everywhere(server, "/e2e/kept", "/kept")
        served_everywhere(server, "/cfg-added", "/added")
        ids = {e["id"]: e for e in listed(server)}
        assert ids["kept"]["is_from_config"] is False and ids["config-2"]["path"] == "/cfg-added", ids
        assert "Traceback" not in server.log()
    after_hup = len(recorded(up, "/kept"))

    with run_gunicorn(config_path, env, workers=WORKERS, threads=THREADS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        served_everywhere(server, "/e2e/kept", "/kept")
        [shown] = listed(server, "kept")
        assert {k: shown[k] for k in ("path", "target", "headers")} == {
            "path": "/e2e/kept",
            "target": made["target"],
            "headers": {"X-Literal": "<redacted>", "X-Env-Token": "os.environ/UPSTREAM_TOKEN"},
        }, shown
        assert "Traceback" not in server.log()
    # Served with the sealed value opened again after the restart.
    kept = recorded(up, "/kept")
    assert len(kept) > after_hup
    for request in kept:
        assert request.header("X-Literal") == LITERAL and request.header("X-Env-Token") == TOKEN, request.headers

    # Restarted without LITELLM_SALT_KEY: the sealed endpoint cannot be opened here, so it is
    # 503 naming the variable (never a value), and a new literal value is refused with 400.
    unsalted = {k: v for k, v in env.items() if k != "LITELLM_SALT_KEY"}
    with run_gunicorn(config_path, unsalted, workers=WORKERS, threads=THREADS) as server:
        wait_until(lambda: len(server.worker_pids()) == WORKERS, 20, "three workers")
        for pid, got in on_every_worker(server, "/e2e/kept").items():
            for answer in got:
                assert answer.status == 503 and "LITELLM_SALT_KEY" in error_message(answer), (pid, answer)
                assert LITERAL.encode() not in answer.body
        refused = admin(server, "POST", API, {"path": "/e2e/unsalted", "target": up.url + "/x", "headers": {"X-Literal": "v"}})
        assert refused.status == 400 and "LITELLM_SALT_KEY" in error_message(refused) and "X-Literal" in error_message(refused), refused
        # An os.environ/ reference needs no salt key.
        create(server, path="/e2e/unsalted", target=up.url + "/unsalted", headers={"X-Env-Token": "os.environ/UPSTREAM_TOKEN"})
        assert errors_by_pid(server.log(), "kept", "LITELLM_SALT_KEY"), server.log()[-3000:]
        assert LITERAL not in server.log() and "Traceback" not in server.log()
    assert len(recorded(up, "/kept")) == len(kept)
