"""Virtual keys across two instances: two gunicorn masters (3 workers each) sharing one
PostgreSQL database and one Redis, as two VMs behind a load balancer would.

Each instance has its own state directory (its usage spool), like separate machines. The
limits must hold across all six workers (exact admissions under a burst, the peak a slow
upstream sees), a block on one instance must reach the other within 2 s, and the stores may
go away mid-run: PostgreSQL stopped (verified keys keep working, unseen keys get 503, no 500,
no traceback, usage rows held and written once it is back) and Redis stopped (per-worker
limits, one WARNING naming Redis per process, the fallback counted in /metrics).

The PostgreSQL and Redis servers are the session's (tests/servers.py): a test that stops one
starts it again in a ``finally``.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import pytest

from tests.conftest import MASTER_KEY
from tests.conftest import config_for
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.test_keys_e2e import REVOCATION_SECONDS
from tests.test_keys_e2e import admin
from tests.test_keys_e2e import call
from tests.test_keys_e2e import concurrently
from tests.test_keys_e2e import cover_workers
from tests.test_keys_e2e import generate
from tests.test_keys_e2e import held
from tests.test_keys_e2e import instance_env
from tests.test_keys_e2e import keyed_endpoints
from tests.test_keys_e2e import metrics_of
from tests.test_keys_e2e import spend_rows
from tests.test_keys_e2e import upstream_paths
from tests.test_keys_e2e import wait_rows
from tests.test_keys_e2e import warnings_by_pid

WORKERS = 3
THREADS = 8
NOTICE_SETTLE = 1.5  # change notices are polled every 0.5 s (proxy_app/notices.py)


@pytest.fixture
def cluster(tmp_path, upstream, pg_url, redis_url):
    """Two instances (A, B) on one PostgreSQL database and one Redis."""
    config = write_config(tmp_path, config_for(*keyed_endpoints(upstream.url), database_url=pg_url))
    with contextlib.ExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            env = instance_env(tmp_path / f"state-{name}", REDIS_URL=redis_url)
            servers.append(stack.enter_context(run_gunicorn(config, env, workers=WORKERS, threads=THREADS)))
        for server in servers:
            wait_until(lambda s=server: len(s.worker_pids()) == WORKERS, 20, "three workers")
        yield servers


def alternate(servers, count: int):
    """``count`` servers, A, B, A, B... (one per request)."""
    return list(itertools.islice(itertools.cycle(servers), count))


def test_rpm_limit_is_exact_across_both_instances(cluster, upstream):
    limit, callers = 6, 30
    a = cluster[0]
    key = generate(a, key_alias="cluster-rpm", rpm_limit=limit)["key"]
    targets = alternate(cluster, callers)
    answers = concurrently(callers, lambda i: call(targets[i], "GET", "/v1/keyed/rpm", key=key))
    statuses = sorted(answer.status for answer in answers)
    assert statuses == [200] * limit + [429] * (callers - limit), answers
    assert len(upstream_paths(upstream, "/k/rpm")) == limit
    served_by = {targets[i].port for i, answer in enumerate(answers) if answer.status == 200}
    remaining = sorted(int(answer.headers["x-ratelimit-remaining-requests"]) for answer in answers if answer.status == 200)
    assert remaining == list(range(limit)), remaining
    for server in cluster:  # no more on either instance
        assert call(server, "GET", "/v1/keyed/rpm", key=key).status == 429
    print(f"rpm burst over two instances: admitted by {len(served_by)} instance(s)")


def test_peak_parallel_across_both_instances_equals_the_limit(cluster, upstream):
    limit = 3
    handler = upstream.route("/k/peak", held(0.4))
    a = cluster[0]
    key = generate(a, key_alias="cluster-parallel", max_parallel_requests=limit)["key"]
    deadline = time.monotonic() + 3.0
    targets = alternate(cluster, 10)

    def caller(i):
        statuses = []
        while time.monotonic() < deadline and len(statuses) < 200:
            answer = call(targets[i], "GET", "/v1/keyed/peak", key=key)
            statuses.append(answer.status)
            if answer.status == 429:
                time.sleep(0.05)
        return statuses

    results = concurrently(10, caller)
    statuses = [s for r in results for s in r]
    assert set(statuses) <= {200, 429}, results
    assert handler.peak == limit, f"peak {handler.peak}, limit {limit}"
    assert statuses.count(200) == handler.count


def test_block_on_one_instance_reaches_the_other_within_2_seconds(cluster, upstream):
    a, b = cluster
    key = generate(a, key_alias="cluster-revoke")["key"]
    for server in cluster:
        for answers in cover_workers(server, key, "/v1/keyed/rev").values():
            assert {x.status for x in answers} == {200}, answers
    assert admin(a, "POST", "/key/block", {"key": key}).status == 200
    time.sleep(REVOCATION_SECONDS)
    for server in (b, a):
        for pid, answers in cover_workers(server, key, "/v1/keyed/rev").items():
            for answer in answers:
                assert answer.status == 401 and "blocked" in answer.json()["error"]["message"].lower(), (server.url, pid, answer)
    assert admin(b, "POST", "/key/unblock", {"key": key}).status == 200
    time.sleep(REVOCATION_SECONDS)
    for server in (a, b):
        for pid, answers in cover_workers(server, key, "/v1/keyed/rev").items():
            assert {x.status for x in answers} == {200}, (server.url, pid, answers)


def test_postgresql_stopped_mid_run(cluster, upstream, postgres):
    a, b = cluster
    made = generate(a, key_alias="cluster-pg-verified", rpm_limit=10_000)
    verified, token = made["key"], made["token"]
    unseen = generate(a, key_alias="cluster-pg-unseen")["key"]
    # Let every worker see the change notices of these two creations first: a notice drops
    # what a worker had verified (see the next test), which is not what this test is about.
    time.sleep(NOTICE_SETTLE)
    for server in cluster:  # every worker of both instances verifies the key
        for answers in cover_workers(server, verified, "/v1/keyed/pg").values():
            assert {x.status for x in answers} == {200}, answers

    outage_ids: set[str] = set()
    statuses: dict[str, list[int]] = {"verified": [], "unseen": [], "master": [], "open": [], "admin": []}
    postgres.stop()
    try:
        for server in cluster:
            for pid, answers in cover_workers(server, verified, "/v1/keyed/pg").items():
                for answer in answers:
                    statuses["verified"].append(answer.status)
                    assert answer.status == 200, (server.url, pid, answer)
                    outage_ids.add(answer.headers["x-litellm-call-id"])
            for _ in range(6):
                answer = call(server, "GET", "/v1/keyed/pg", key=unseen)
                statuses["unseen"].append(answer.status)
                assert answer.status == 503 and answer.json()["error"]["code"] == "503", answer
                master = call(server, "GET", "/v1/keyed/pg-master", key=MASTER_KEY)
                statuses["master"].append(master.status)
                assert master.status == 200, master
                outage_ids.add(master.headers["x-litellm-call-id"])
                opened = call(server, "GET", "/open")
                statuses["open"].append(opened.status)
                assert opened.status == 200, opened
                outage_ids.add(opened.headers["x-litellm-call-id"])
            info = admin(server, "GET", f"/key/info?key={token}")
            statuses["admin"].append(info.status)
            assert info.status == 503 and info.json()["error"]["code"] == "503", info
    finally:
        postgres.start()
    # Held on each instance's disk, then written once the database is back: none lost, none twice.
    rows = wait_rows(a, outage_ids, timeout=30)
    assert len(rows) == len(outage_ids)
    assert {row["request_id"] for row in spend_rows(b, api_key=token)} >= {row["request_id"] for row in rows if row["api_key"] == token}
    # The key works again everywhere once the database is back.
    for server in cluster:
        assert call(server, "GET", "/v1/keyed/pg", key=unseen).status == 200
    for server in cluster:
        log = server.log()
        assert "Traceback" not in log, log[-4000:]
        assert '"status":500' not in log, "a 500 in the access log"
        samples = metrics_of(server)
        assert samples["proxy_usage_rows_dropped_total"] == 0
        assert samples['proxy_store_errors_total{operation="key_lookup",store="database"}'] > 0, server.url
    print(f"PostgreSQL outage: {sum(len(v) for v in statuses.values())} requests, {len(outage_ids)} usage rows held and written")


def test_redis_stopped_mid_run(cluster, upstream, redis_server):
    a = cluster[0]
    limit = 3
    key = generate(a, key_alias="cluster-redis", rpm_limit=limit)["key"]
    redis_server.stop()
    try:
        admitted: dict[tuple[int, int], int] = {}
        refused = 0
        for server in cluster:
            answers = [x for found in cover_workers(server, key, "/v1/keyed/redis", max_requests=300).values() for x in found]
            # Enough requests that every worker would exceed the limit if nothing held it.
            answers += [call(server, "GET", "/v1/keyed/redis", key=key, want_pid=True) for _ in range(30)]
            for answer in answers:
                assert answer.status in (200, 429), (server.url, answer)
                refused += answer.status == 429
                if answer.status == 200:
                    assert answer.pid is not None, answer
                    admitted[server.port, answer.pid] = admitted.get((server.port, answer.pid), 0) + 1
        assert admitted, "no request was served while Redis was down"
        assert max(admitted.values()) <= limit, f"a worker admitted more than its own limit: {admitted}"
        assert refused > 0, "no request was limited while Redis was down"
        for server in cluster:
            samples = metrics_of(server)
            assert samples["proxy_limiter_local_fallback_total"] > 0, server.url
            assert samples['proxy_store_errors_total{operation="limit",store="redis"}'] > 0, server.url
            warnings = warnings_by_pid(server.log(), r"redis")
            assert warnings, f"no WARNING naming Redis in the log of {server.url}"
            assert max(warnings.values()) == 1, f"more than one Redis WARNING per process: {warnings}"
            assert "Traceback" not in server.log()
    finally:
        redis_server.start()

    # Back on Redis: one limit across both instances again (a fresh key, bounded retries
    # while each worker's one-second pause before asking Redis again runs out).
    def shared_again():
        fresh = generate(a, rpm_limit=2)["key"]
        statuses = [call(server, "GET", "/v1/keyed/redis-back", key=fresh).status for server in alternate(cluster, 12)]
        return statuses.count(200) == 2

    time.sleep(1.5)
    wait_until(shared_again, 15, "limits shared through Redis again")


def test_a_verified_key_survives_an_unrelated_key_change_then_an_outage(cluster, upstream, postgres):
    """Verified recently, then ANOTHER key is created, then the database goes away: the
    verified key must keep working (it was verified within key_cache_ttl, 60 s)."""
    a = cluster[0]
    verified = generate(a, key_alias="cluster-pg-change-verified")["key"]
    time.sleep(NOTICE_SETTLE)
    for answers in cover_workers(a, verified, "/v1/keyed/pg-change").values():
        assert {x.status for x in answers} == {200}, answers
    generate(a, key_alias="cluster-pg-change-other")  # an unrelated change
    time.sleep(NOTICE_SETTLE)
    postgres.stop()
    try:
        refused = []
        for pid, answers in cover_workers(a, verified, "/v1/keyed/pg-change").items():
            refused += [(pid, answer) for answer in answers if answer.status != 200]
    finally:
        postgres.start()
    assert refused == [], f"a key verified seconds before the outage was refused: {refused[:3]}"
