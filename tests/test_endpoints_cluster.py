"""The endpoint API across two instances: two gunicorn masters (3 workers each) sharing one
PostgreSQL database (``DATABASE_URL``) and one Redis, as two VMs behind a load balancer would.

A change made on one instance must be served by every worker of both within 2 s, with no
restart. Each instance resolves a stored endpoint from its own environment: one that lacks a
variable answers that endpoint 503 naming the variable (and logs an ERROR), while the other
serves it; a literal value sealed by one is opened by the other with the same
``LITELLM_SALT_KEY``.

The PostgreSQL and Redis servers are the session's real ones (tests/servers.py fixtures
``postgres``, ``redis_server``: a new database for this module); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import re
import time

import psycopg
import pytest

from tests.conftest import config_for
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.test_endpoints_e2e import API
from tests.test_endpoints_e2e import SALT_KEY
from tests.test_endpoints_e2e import TOKEN
from tests.test_endpoints_e2e import config_endpoints
from tests.test_endpoints_e2e import converge
from tests.test_endpoints_e2e import create
from tests.test_endpoints_e2e import delete
from tests.test_endpoints_e2e import error_message
from tests.test_endpoints_e2e import errors_by_pid
from tests.test_endpoints_e2e import first_new
from tests.test_endpoints_e2e import listed
from tests.test_endpoints_e2e import on_every_worker
from tests.test_endpoints_e2e import recorded
from tests.test_endpoints_e2e import target_of
from tests.test_keys_e2e import admin
from tests.test_keys_e2e import concurrently
from tests.test_keys_e2e import instance_env
from tests.upstream import Upstream

WORKERS = 3
THREADS = 8
ONLY_ON_A = "ONLY_ON_A_TOKEN"  # set on instance A, not on B
ONLY_ON_A_VALUE = "only-on-a-value-31b7"


@pytest.fixture(scope="module")
def upstream():
    """One recording upstream for the module's cluster (each test uses paths of its own)."""
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, upstream, postgres, redis_server):
    """Two instances (A, B) on one PostgreSQL database (DATABASE_URL) and one Redis, shared by
    the module's tests (starting two 3-worker instances costs seconds; each test uses its own
    paths and ids)."""
    tmp_path = tmp_path_factory.mktemp("endpoints-cluster")
    postgres.start()  # an earlier test may have left it stopped
    pg_url = postgres.new_database()
    redis_server.start()
    redis_server.flush()
    config = write_config(tmp_path, config_for(*config_endpoints(upstream.url)))
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for name in ("a", "b"):
                extra = {"DATABASE_URL": pg_url, "REDIS_URL": redis_server.url, "LITELLM_SALT_KEY": SALT_KEY, "UPSTREAM_TOKEN": TOKEN}
                if name == "a":
                    extra[ONLY_ON_A] = ONLY_ON_A_VALUE
                env = instance_env(tmp_path / f"state-{name}", **extra)
                if name == "b":
                    env.pop(ONLY_ON_A, None)
                servers.append(stack.enter_context(run_gunicorn(config, env, workers=WORKERS, threads=THREADS)))
            for server in servers:
                wait_until(lambda s=server: len(s.worker_pids()) == WORKERS, 20, "three workers")
            yield servers
            for server in servers:
                assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        with contextlib.suppress(psycopg.Error):
            postgres.drop_database(pg_url)


def converge_both(servers, path: str, is_new, since: float) -> list[float]:
    """:func:`converge` on every instance at once (each from the change's answer on): when the
    last worker of each served the new version, in seconds after the change."""
    results = concurrently(len(servers), lambda i: first_new(converge(servers[i], path, is_new, since), is_new))
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def test_create_on_a_reaches_every_worker_of_b_and_delete_on_b_every_worker_of_a(cluster, upstream):
    a, b = cluster
    made = create(a, path="/cluster/life", target=upstream.url + "/life", headers={"X-Env-Token": "os.environ/UPSTREAM_TOKEN"})
    since = time.monotonic()
    # Instance B has no SQLite file of its own in play: the row is in PostgreSQL.
    assert [e["id"] for e in listed(b) if not e["is_from_config"]] == [made["id"]]
    took = converge_both([b, a], "/cluster/life", lambda x: target_of(x) == "/life", since)
    print(f"create on A served by every worker of B {took[0]:.2f}s, of A {took[1]:.2f}s after the answer")
    reached = recorded(upstream, "/life")
    assert reached
    for request in reached:
        assert request.header("X-Env-Token") == TOKEN, request.headers

    gone = delete(b, made["id"])
    since = time.monotonic()
    assert gone["endpoints"][0]["id"] == made["id"]
    took = converge_both([a, b], "/cluster/life", lambda x: x.status == 404, since)
    print(f"delete on B served by every worker of A {took[0]:.2f}s, of B {took[1]:.2f}s after the answer")
    assert admin(a, "GET", f"{API}?endpoint_id={made['id']}").status == 404
    assert f"(id {made['id']}) created by POST {API}" in a.log()
    assert f"(id {made['id']}) deleted by DELETE {API}" in b.log()


def test_a_variable_only_a_has_is_served_by_a_and_503_on_b(cluster, upstream):
    a, b = cluster
    other = create(a, path="/cluster/fine", target=upstream.url + "/fine")
    made = create(a, path="/cluster/only-a", target=upstream.url + "/only-a", headers={"X-Only": f"os.environ/{ONLY_ON_A}"})
    since = time.monotonic()
    on_a = converge(a, "/cluster/only-a", lambda x: target_of(x) == "/only-a", since)
    seen = converge(b, "/cluster/only-a", lambda x: x.status == 503, since)
    for got in seen.values():
        for _, answer in got:
            if answer.status == 503:
                message = error_message(answer)
                assert ONLY_ON_A in message and ONLY_ON_A_VALUE not in message, answer
    # Only A's requests reached the upstream, each with A's value.
    reached = recorded(upstream, "/only-a")
    assert reached and len(reached) == sum(1 for got in on_a.values() for _, x in got if x.status == 200)
    for request in reached:
        assert request.header("X-Only") == ONLY_ON_A_VALUE, request.headers

    errors = errors_by_pid(b.log(), re.escape(made["id"]), ONLY_ON_A)
    assert errors, f"no ERROR line naming {made['id']} and {ONLY_ON_A} in B's log:\n{b.log()[-3000:]}"
    assert errors_by_pid(a.log(), re.escape(made["id"])) == {}, "A logged an ERROR for an endpoint it can serve"
    for log in (a.log(), b.log()):
        assert ONLY_ON_A_VALUE not in log
    # B keeps serving the rest on every worker.
    for path, target in (("/cfg", "/cfg"), ("/cluster/fine", "/fine")):
        for pid, got in on_every_worker(b, path).items():
            assert {target_of(x) for x in got} == {target}, (path, pid, got)
    # Listed the same on both, as written.
    for server in cluster:
        [shown] = listed(server, made["id"])
        assert shown["headers"] == {"X-Only": f"os.environ/{ONLY_ON_A}"}, shown
    delete(b, made["id"])
    delete(b, other["id"])


def test_a_literal_value_sealed_on_one_instance_is_served_by_both(cluster, upstream):
    a, b = cluster
    secret = "cluster-literal-4e0f6a"
    made = create(
        b,
        path="/cluster/sealed",
        target=upstream.url + "/sealed",
        headers={"X-Literal": secret, "X-Env-Token": "os.environ/UPSTREAM_TOKEN"},
    )
    assert made["headers"]["X-Literal"] == "<redacted>"
    since = time.monotonic()
    converge_both([a, b], "/cluster/sealed", lambda x: target_of(x) == "/sealed", since)
    reached = recorded(upstream, "/sealed")
    assert reached
    for request in reached:
        assert request.header("X-Literal") == secret and request.header("X-Env-Token") == TOKEN, request.headers
    # Updated on A (another value, another target path to tell the versions apart): both
    # serve the new one, sealed by A and opened by B.
    newer = secret + "-rotated"
    changed = admin(
        a,
        "POST",
        f"{API}/{made['id']}",
        {"target": upstream.url + "/sealed-v2", "headers": {"X-Literal": newer, "X-Env-Token": "<redacted>"}},
    )
    assert changed.status == 200, changed
    since = time.monotonic()
    converge_both([a, b], "/cluster/sealed", lambda x: target_of(x) == "/sealed-v2", since)
    late = recorded(upstream, "/sealed-v2")
    assert late
    for request in late:
        assert request.header("X-Literal") == newer and request.header("X-Env-Token") == TOKEN, request.headers
    for server in cluster:
        for answer in (admin(server, "GET", API), admin(server, "GET", f"{API}?endpoint_id={made['id']}")):
            assert secret.encode() not in answer.body and newer.encode() not in answer.body
        assert secret not in server.log() and newer not in server.log()
