"""The limiter (proxy_app/limiter.py) against real stores: SQLite files, PostgreSQL, Redis."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import sqlite3
import threading
import time

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select

from proxy_app import schema
from proxy_app.limit_claims import CLAIM_SECONDS
from proxy_app.limit_claims import MAX_CLAIM
from proxy_app.limiter import DatabaseLimiter
from proxy_app.limiter import LocalLimiter
from proxy_app.limiter import RedisLimiter
from proxy_app.limiter import WithFallback
from proxy_app.limiter import decide
from proxy_app.limiter import retry_after

TOKEN = "a" * 64
CTX = multiprocessing.get_context("fork")


def sqlite_engine(path: str):
    # What the store's engine sets on SQLite (WAL, busy timeout), so workers can share the file.
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        # busy_timeout first, as proxy_app/store.py does: switching to WAL needs a lock that
        # another process's connection may hold (a busy CI machine showed "database is locked").
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def pg_engine(url: str):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=2)


def build(spec, **options):
    """A limiter from a picklable spec, in this process (children build their own after fork)."""
    kind, where = spec
    if kind == "local":
        return LocalLimiter(window=options.get("window", 60.0))
    if kind == "redis":
        return RedisLimiter(where, **options)
    engine = sqlite_engine(where) if kind == "sqlite" else pg_engine(where)
    return DatabaseLimiter(engine, **options)


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def spec(request, tmp_path):
    if request.param == "sqlite":
        path = str(tmp_path / "limits.db")
        created = sqlite_engine(path)
        schema.metadata.create_all(created)
        # Closed now, not whenever garbage collection gets to it: a connection open in this
        # process when a test forks is copied into the children with SQLite's in-memory lock
        # and shared-memory state, which their own connections to the file then trust
        # ("do not open a database connection, then fork()",
        # https://www.sqlite.org/howtocorrupt.html). The proxy's master disposes its engine
        # before forking for the same reason (proxy_app/lifecycle.py).
        created.dispose()
        return ("sqlite", path)
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        engine = pg_engine(url)
        schema.metadata.create_all(engine)
        engine.dispose()
        return ("postgresql", url)
    return ("redis", request.getfixturevalue("redis_url"))


@pytest.mark.parametrize(
    ("now", "rpm", "in_window", "oldest", "par", "live", "expected"),
    [
        # allowed: remaining after this request, reset until the oldest leaves the window
        (100.0, 10, 0, None, None, 0, (True, None, 0, 9, 60.0)),
        (100.0, 10, 3, 70.0, None, 0, (True, None, 0, 6, 30.0)),
        (100.0, None, 0, None, 2, 1, (True, None, 0, None, None)),
        # rpm refusal: seconds until the oldest is 60 s old, rounded up, at least 1
        (100.0, 2, 2, 50.5, None, 0, (False, "rpm", 11, 0, 10.5)),
        (100.0, 2, 2, 40.0, None, 0, (False, "rpm", 1, 0, 0.0)),
        (100.0, 0, 0, None, None, 0, (False, "rpm", 60, 0, 60.0)),
        # parallel refusal: Retry-After 1, nothing consumed (remaining unchanged)
        (100.0, 10, 3, 70.0, 2, 2, (False, "parallel", 1, 7, 30.0)),
        (100.0, None, 0, None, 1, 1, (False, "parallel", 1, None, None)),
        # rpm is checked first
        (100.0, 1, 1, 99.0, 1, 1, (False, "rpm", 59, 0, 59.0)),
    ],
)
def test_decide(now, rpm, in_window, oldest, par, live, expected):
    answer = decide(now, rpm, in_window, oldest, par, live)
    got = (answer.allowed, answer.reason, answer.retry_after, answer.rpm_remaining, answer.reset_seconds)
    assert got[:4] == expected[:4]
    assert (got[4] is None) == (expected[4] is None)
    if got[4] is not None:
        assert got[4] == pytest.approx(expected[4])


@pytest.mark.parametrize(("seconds", "header"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.01, 2), (59.999, 60)])
def test_retry_after(seconds, header):
    assert retry_after(seconds) == header


def test_neither_limit_skips_the_store():
    # A RedisLimiter on a closed port: admit must not touch it.
    limiter = RedisLimiter("redis://127.0.0.1:1/0")
    answer = limiter.admit(TOKEN, None, None)
    assert answer.allowed and answer.lease is None and answer.rpm_limit is None
    limiter.release(None)
    limiter.close()


def _burst(spec, rpm, par, tries, start, results):
    limiter = build(spec)
    start.wait(10)
    admitted = sum(1 for _ in range(tries) if limiter.admit(TOKEN, rpm, par).allowed)
    results.put(admitted)
    results.close()
    results.join_thread()  # the queue's feeder thread must send it before _exit
    os._exit(0)  # keep the leases: the parent checks nothing was given back


def run_burst(spec, rpm, par, processes=4, tries=15):
    start = CTX.Event()
    results = CTX.Queue()
    children = [CTX.Process(target=_burst, args=(spec, rpm, par, tries, start, results)) for _ in range(processes)]
    for child in children:
        child.start()
    start.set()
    counts = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(10)
    return sum(counts)


@pytest.mark.parametrize(("rpm", "par", "expected"), [(20, None, 20), (None, 7, 7), (25, 9, 9), (6, 40, 6)])
def test_exact_admissions_under_a_burst_from_processes(spec, rpm, par, expected):
    assert run_burst(spec, rpm, par) == expected


def test_refused_requests_consume_nothing(spec):
    limiter = build(spec)
    try:
        first = limiter.admit(TOKEN, 3, 1)
        assert (first.allowed, first.rpm_remaining) == (True, 2)
        for _ in range(5):  # refused for parallelism: no rpm entry used
            refused = limiter.admit(TOKEN, 3, 1)
            assert (refused.allowed, refused.reason, refused.retry_after, refused.rpm_remaining) == (False, "parallel", 1, 2)
        limiter.release(first.lease)
        limiter.flush()  # releases are given back in batches; flush() gives this one back now
        second = limiter.admit(TOKEN, 3, 1)
        assert (second.allowed, second.rpm_remaining) == (True, 1)
        limiter.release(second.lease)
        limiter.flush()
        third = limiter.admit(TOKEN, 3, 1)
        assert (third.allowed, third.rpm_remaining) == (True, 0)
        limiter.release(third.lease)
        limiter.flush()
        for _ in range(3):  # refused for rpm: no slot taken
            refused = limiter.admit(TOKEN, 3, 1)
            assert (refused.allowed, refused.reason, refused.retry_after) == (False, "rpm", 60)
            assert 59 < refused.reset_seconds <= 60
        assert limiter.admit(TOKEN, None, 1).allowed  # the slot is free
    finally:
        limiter.close()


def test_release_is_idempotent(spec):
    limiter = build(spec)
    try:
        a = limiter.admit(TOKEN, None, 2)
        b = limiter.admit(TOKEN, None, 2)
        assert a.allowed and b.allowed
        limiter.release(a.lease)
        limiter.release(a.lease)  # twice: frees one slot only
        limiter.release(None)
        limiter.flush()
        limiter.release(a.lease)  # after its batch went: still nothing more
        limiter.flush()
        assert limiter.admit(TOKEN, None, 2).allowed
        assert not limiter.admit(TOKEN, None, 2).allowed
    finally:
        limiter.close()


def _hold(spec, par, rounds, in_flight, peak, lock):
    limiter = build(spec)
    for _ in range(rounds):
        answer = limiter.admit(TOKEN, None, par)
        if not answer.allowed:
            time.sleep(0.01)
            continue
        with lock:
            in_flight.value += 1
            peak.value = max(peak.value, in_flight.value)
        time.sleep(0.1)  # longer than a batch of releases takes to go back, so holders overlap
        with lock:
            in_flight.value -= 1
        limiter.release(answer.lease)
    limiter.close()
    os._exit(0)


def test_parallel_peak_never_above_the_limit(spec):
    lock = CTX.Lock()
    in_flight = CTX.Value("i", 0, lock=False)
    peak = CTX.Value("i", 0, lock=False)
    children = [CTX.Process(target=_hold, args=(spec, 3, 60, in_flight, peak, lock)) for _ in range(5)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert peak.value == 3


def _admit_and_wait(spec, admitted):
    limiter = build(spec, lease_seconds=2.0, renew_every=0.3)
    assert limiter.admit(TOKEN, None, 1).allowed
    admitted.set()
    time.sleep(60)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "redis"])
def test_slot_of_a_killed_worker_comes_back_after_its_lease(spec, kind):
    if spec[0] != kind:
        pytest.skip("one backend per run of this test")
    admitted = CTX.Event()
    child = CTX.Process(target=_admit_and_wait, args=(spec, admitted))
    child.start()
    assert admitted.wait(20)
    # The child renews its lease (every 0.3 s): still held well after 2 s.
    limiter = build(spec, lease_seconds=2.0)
    try:
        time.sleep(2.5)
        assert not limiter.admit(TOKEN, None, 1).allowed
        os.kill(child.pid, signal.SIGKILL)
        child.join(5)
        killed = time.monotonic()
        while not limiter.admit(TOKEN, None, 1).allowed:
            assert time.monotonic() - killed < 5, "the slot of a killed worker never came back"
            time.sleep(0.1)
        assert time.monotonic() - killed <= 2.5
    finally:
        limiter.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "redis", "local"])
def test_sliding_window_has_no_edge_burst(spec, kind):
    if kind != "local" and spec[0] != kind:
        pytest.skip("one backend per run of this test")
    if kind == "local" and spec[0] != "sqlite":
        pytest.skip("once")
    limiter = build(("local", None) if kind == "local" else spec, window=2.0)
    try:
        first = time.time()
        assert [limiter.admit(TOKEN, 3, None).allowed for _ in range(3)] == [True, True, True]
        time.sleep(1.0)  # a fixed window of 2 s could reset around here
        refused = limiter.admit(TOKEN, 3, None)
        assert (refused.allowed, refused.reason, refused.retry_after) == (False, "rpm", 1)
        assert 0.5 < refused.reset_seconds <= 1.05
        while not limiter.admit(TOKEN, 3, None).allowed:
            assert time.time() - first < 4
            time.sleep(0.05)
        assert time.time() - first >= 1.95  # only once the first admission left the window
    finally:
        limiter.close()


def test_renewal_keeps_a_live_lease(spec):
    # Renewed every 0.2 s, a 2 s lease outlives a stall of the renewal thread of up to 1.8 s
    # (a loaded CI machine); unrenewed it would have expired by the check at 3 s.
    limiter = build(spec, lease_seconds=2.0, renew_every=0.2)
    try:
        held = limiter.admit(TOKEN, None, 1)
        assert held.allowed
        time.sleep(3.0)
        assert not limiter.admit(TOKEN, None, 1).allowed
        limiter.release(held.lease)
        limiter.flush()
        assert limiter.admit(TOKEN, None, 1).allowed
    finally:
        limiter.close()


def _sample(name):
    return REGISTRY.get_sample_value(name) or 0.0


def test_redis_stopped_mid_run_falls_back_then_recovers(tmp_path, caplog):
    from tests.servers import start_redis  # a private server: this test stops it

    server = start_redis(tmp_path)
    limiter = WithFallback(RedisLimiter(server.url), retry_every=0.3)
    try:
        before = _sample("proxy_limiter_local_fallback_total")
        shared = limiter.admit(TOKEN, 100, 2)
        assert shared.allowed and shared.lease.owner is limiter.redis
        server.stop()
        with caplog.at_level(logging.WARNING, logger="proxy_app"):
            answers = []
            for _ in range(20):
                answers.append(limiter.admit(TOKEN, 100, 2))
                time.sleep(0.03)
        # Local counters: this worker's own 2 slots, then refusals; never an exception.
        assert [a.allowed for a in answers[:3]] == [True, True, False]
        assert all(a.lease is None or a.lease.owner is limiter.local for a in answers)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Redis at 127.0.0.1" in warnings[0].getMessage()
        assert _sample("proxy_limiter_local_fallback_total") - before == 20
        limiter.release(shared.lease)  # Redis down: never raises
        for answer in answers:
            limiter.release(answer.lease)  # local leases go back to the local counters
        assert limiter.local.admit(TOKEN, None, 2).allowed
        server.start()
        time.sleep(0.4)
        back = limiter.admit(TOKEN, 100, 2)
        assert back.allowed and back.lease.owner is limiter.redis and not limiter.degraded
        assert back.rpm_remaining == 99  # a fresh Redis: shared counting again
    finally:
        limiter.close()
        server.close()


def _cost(limiter, rounds=2000):
    # A max_parallel above the rounds: releases go back in batches, a few at once are still held.
    limiter.release(limiter.admit("b" * 64, 10**9, 10**6).lease)
    started = time.perf_counter()
    for _ in range(rounds):
        limiter.release(limiter.admit("b" * 64, 10**9, 10**6).lease)
    return (time.perf_counter() - started) / rounds * 1e6


def test_cost_of_admit_and_release(spec, capsys):
    limiter = build(spec)
    try:
        micros = _cost(limiter, 500)
    finally:
        limiter.close()
    with capsys.disabled():
        print(f"\nlimiter {spec[0]}: admit+release {micros:.0f} us (500 rounds)")
    local = LocalLimiter()
    with capsys.disabled():
        print(f"limiter local: admit+release {_cost(local):.1f} us")


def wait_until(check, seconds: float) -> float:
    """Seconds until ``check()`` is true (polling, bounded); fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.01)
    return time.monotonic() - started


def test_a_released_slot_is_free_again_within_a_second(spec):
    limiter = build(spec)
    other = build(spec)  # another worker: sees the store, not this one's queue
    try:
        held = limiter.admit(TOKEN, None, 1)
        assert held.allowed
        limiter.release(held.lease)  # queued: no flush() here
        waited = wait_until(lambda: _probe(other), 1.0)
        assert waited < 1.0
    finally:
        limiter.close()
        other.close()


def _probe(limiter) -> bool:
    """Whether a slot is free: takes one, and gives it back at once if it got it."""
    answer = limiter.admit(TOKEN, None, 1)
    if answer.allowed:
        limiter.release(answer.lease)
        limiter.flush()
    return answer.allowed


def test_a_release_is_not_renewed_while_queued(spec):
    # A lease released but not yet given back is never renewed: the store frees it when it
    # expires even if the batch never goes (here: the thread is slower than the lease).
    limiter = build(spec, lease_seconds=1.0, renew_every=0.2)
    other = build(spec)
    try:
        held = limiter.admit(TOKEN, None, 1)
        assert held.allowed
        limiter._keeper._flush_every = 30.0  # the batch would go far too late
        limiter._keeper.release(held.lease)
        assert limiter._keeper.live() == [] and limiter._keeper.queued() == 1
        limiter.renew_now()
        wait_until(lambda: _probe(other), 3.0)
    finally:
        limiter.close()
        other.close()


def test_close_gives_back_queued_slots(spec):
    limiter = build(spec)
    other = build(spec)
    try:
        leases = [limiter.admit(TOKEN, None, 3).lease for _ in range(3)]
        assert all(leases) and not other.admit(TOKEN, None, 3).allowed
        limiter._keeper._flush_every = 30.0  # the thread would not give them back in time
        for lease in leases:
            limiter.release(lease)
        limiter.close()  # a stopping worker gives its slots back
        assert [other.admit(TOKEN, None, 3).allowed for _ in range(4)] == [True, True, True, False]
    finally:
        other.close()


def test_close_releases_nothing_else(spec):
    limiter = build(spec)
    other = build(spec)
    try:
        assert limiter.admit(TOKEN, None, 1).allowed
        limiter.close()  # the lease is still held: it runs out by itself
        assert not other.admit(TOKEN, None, 1).allowed
    finally:
        other.close()


def test_releases_survive_a_brief_redis_outage(tmp_path, caplog):
    from tests.servers import start_redis  # a private server: this test stops it

    server = start_redis(tmp_path)
    limiter = RedisLimiter(server.url, lease_seconds=60.0)
    try:
        leases = [limiter.admit(TOKEN, None, 2).lease for _ in range(2)]
        server.stop()
        with caplog.at_level(logging.WARNING, logger="proxy_app"):
            for lease in leases:
                limiter.release(lease)
            time.sleep(0.5)  # the batch fails, stays queued
            assert limiter._keeper.queued() == 2
            assert not limiter.flush()
        assert len([r for r in caplog.records if "giving back" in r.getMessage()]) == 1  # at most once a minute
        server.start()
        # Given back by the thread's next try, without flush() (the restarted Redis is empty,
        # so the queue draining is what proves the batch went).
        wait_until(lambda: limiter._keeper.queued() == 0, 5.0)
        assert [limiter.admit(TOKEN, None, 2).allowed for _ in range(3)] == [True, True, False]
    finally:
        limiter.close()
        server.close()


def test_releases_survive_a_brief_database_outage(tmp_path):
    # SQLite's outage: another process holds the write lock longer than busy_timeout allows.
    path = str(tmp_path / "limits.db")
    created = sqlite_engine(path)
    schema.metadata.create_all(created)
    created.dispose()
    limiter = DatabaseLimiter(sqlite_engine(path))
    other = DatabaseLimiter(sqlite_engine(path))
    blocker = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        leases = [limiter.admit(TOKEN, None, 2).lease for _ in range(2)]
        # This thread gives the batch back (flush()), failing fast instead of waiting 5 s for the lock.
        limiter._connections.get().cursor.execute("PRAGMA busy_timeout = 100")
        limiter._keeper._flush_every = 30.0
        blocker.execute("BEGIN IMMEDIATE")
        for lease in leases:
            limiter.release(lease)
        assert not limiter.flush()  # locked: kept
        assert limiter._keeper.queued() == 2
        blocker.execute("ROLLBACK")
        assert limiter.flush()
        assert limiter._keeper.queued() == 0
        assert [other.admit(TOKEN, None, 2).allowed for _ in range(3)] == [True, True, False]
    finally:
        blocker.close()
        limiter.close()
        other.close()


def test_a_refusal_gives_back_this_workers_queued_releases_first(spec):
    # The batch has not gone yet, but this worker holds the key's released slot in its queue:
    # it gives it back at once rather than refuse (as a synchronous release would have).
    limiter = build(spec)
    try:
        held = limiter.admit(TOKEN, None, 1)
        limiter._keeper._flush_every = 30.0
        limiter.release(held.lease)
        again = limiter.admit(TOKEN, None, 1)
        assert again.allowed and limiter._keeper.queued() == 0
        assert not limiter.admit(TOKEN, None, 1).allowed  # really one slot
    finally:
        limiter.close()


def test_threads_at_the_parallel_limit_are_never_refused(spec):
    # As many threads as max_parallel, each taking a slot and releasing it in turn: a
    # synchronous release would admit every one. The worker's release thread gives back
    # batches meanwhile, and a refusal that raced one (the batch off the queue, not yet in
    # the store) must ask again, not refuse.
    limiter = build(spec)
    threads, rounds = 8, 150
    refused = []
    start = threading.Barrier(threads)

    def loop():
        start.wait(10)
        for _ in range(rounds):
            answer = limiter.admit(TOKEN, None, threads)
            if not answer.allowed:
                refused.append(answer.reason)
                continue
            limiter.release(answer.lease)

    try:
        workers = [threading.Thread(target=loop) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert not any(worker.is_alive() for worker in workers)
        assert refused == []
    finally:
        limiter.close()


def test_window_stays_exact_after_a_keys_rows_were_cleaned_up(spec):
    # The database limiter reads the window from the primary key (token, id) and starts its look
    # for the oldest row at its previous answer: once every row of the key was deleted, the next
    # numbers must still come after the ones it remembers, here and in another worker.
    if spec[0] == "redis":
        pytest.skip("the database limiter's rows")
    limiter = build(spec, window=0.5, cleanup_every=0.0)
    other = build(spec, window=0.5, cleanup_every=0.0)
    try:
        assert [limiter.admit(TOKEN, 2, None).allowed for _ in range(3)] == [True, True, False]
        assert not other.admit(TOKEN, 2, None).allowed
        time.sleep(0.6)
        limiter.renew_now()  # cleanup: the key has no row left
        with limiter._engine.connect() as conn:
            assert conn.execute(schema.admissions.select()).fetchall() == []
        first = other.admit(TOKEN, 2, None)
        assert (first.allowed, first.rpm_remaining) == (True, 1)
        assert [limiter.admit(TOKEN, 2, None).allowed for _ in range(2)] == [True, False]
        assert not other.admit(TOKEN, 2, None).allowed
    finally:
        limiter.close()
        other.close()


def test_slots_are_one_counter_per_worker_in_the_store(spec):
    # The database limiter keeps a key's slots as one row per worker (its holder), updated in
    # place: an admission adds one, a batch of releases takes them off, a worker that stopped
    # renewing stops counting once its row runs out, and cleanup then deletes the row.
    if spec[0] == "redis":
        pytest.skip("the database limiter's rows")
    a = build(spec, lease_seconds=1.0, renew_every=0.2, cleanup_every=0.0)
    b = build(spec, lease_seconds=1.0, renew_every=0.2, cleanup_every=0.0)
    slots = schema.slots

    def rows() -> dict[str, int]:
        with a._engine.connect() as conn:
            return dict(conn.execute(select(slots.c.holder, slots.c.live).where(slots.c.token == TOKEN)).all())

    try:
        held = [a.admit(TOKEN, None, 3).lease for _ in range(2)]
        mine = [b.admit(TOKEN, None, 3).lease]
        assert all(held + mine) and not b.admit(TOKEN, None, 3).allowed
        assert a.holder() != b.holder()
        assert rows() == {a.holder(): 2, b.holder(): 1}
        a.release(held[0])
        assert a.flush()
        assert rows() == {a.holder(): 1, b.holder(): 1}
        mine.append(b.admit(TOKEN, None, 3).lease)
        assert mine[-1] is not None and not b.admit(TOKEN, None, 3).allowed
        a.close()  # stops renewing; its one slot stays held until its row runs out
        time.sleep(1.2)
        assert b.admit(TOKEN, None, 3).allowed  # b renewed its row; a's counts for nothing now
        time.sleep(1.1)
        b.renew_now()  # cleanup: a's row ran out more than a lease ago
        assert rows() == {b.holder(): 3}
        with a._engine.begin() as conn:  # as if b's row had been cleaned up while it stalled
            conn.execute(slots.update().values(live=1))
        for lease in mine:
            b.release(lease)
        assert b.flush()
        assert rows() == {b.holder(): 0}  # never below 0
    finally:
        a.close()
        b.close()


def _store(limiter) -> tuple[list[float], int]:
    """The key's rpm rows' times, and its live slots summed over every holder."""
    with limiter._engine.connect() as conn:
        times = conn.execute(select(schema.admissions.c.admitted_at).where(schema.admissions.c.token == TOKEN).order_by(schema.admissions.c.id)).scalars().all()
        live = conn.execute(select(func.coalesce(func.sum(schema.slots.c.live), 0)).where(schema.slots.c.token == TOKEN)).scalar_one()
    return times, live


def test_a_busy_worker_claims_admissions_the_store_counts_in_full(spec):
    # Far from its limits a busy worker takes several admissions per transaction
    # (proxy_app/limit_claims.py): the store counts each of them, in the rpm window and on the
    # worker's slot counter, before it is handed out; the slots of those never handed out go
    # back once the claim runs out.
    if spec[0] == "redis":
        pytest.skip("the database limiter's claims")
    limiter = build(spec)
    try:
        started = time.time()
        answers = [limiter.admit(TOKEN, 10_000, 1000) for _ in range(300)]
        assert all(a.allowed for a in answers)
        assert [a.rpm_remaining for a in answers[:3]] == [9999, 9998, 9997]
        assert sorted({a.rpm_remaining for a in answers}, reverse=True) == [a.rpm_remaining for a in answers]
        times, live = _store(limiter)
        assert 300 <= len(times) <= 300 + MAX_CLAIM - 1 and live == len(times)
        # claims happened: rows a microsecond apart, counted from a claim's last moment
        runs = sum(1 for a, b in itertools.pairwise(times) if b - a < 2e-6)
        assert runs > 100
        assert max(times) > started + 0.2
        time.sleep(CLAIM_SECONDS + 0.5)  # the claim ran out, its unused slots were given back
        assert _store(limiter) == (times, 300)
        for answer in answers:
            limiter.release(answer.lease)
        assert limiter.flush()
        assert _store(limiter) == (times, 0)
    finally:
        limiter.close()


def test_claims_stay_exact_near_a_limit(spec):
    # A claim takes at most 1/64 of what is left: a worker admitting continuously gets every
    # admission of its rpm_limit, and the store holds exactly that many.
    if spec[0] == "redis":
        pytest.skip("the database limiter's claims")
    limiter = build(spec)
    try:
        assert sum(limiter.admit(TOKEN, 300, None).allowed for _ in range(400)) == 300
        assert len(_store(limiter)[0]) == 300
    finally:
        limiter.close()


def test_claims_never_go_over_a_limit_under_a_burst_from_processes(spec):
    # Four processes admit 400 times each against rpm_limit 1000 and max_parallel 2000 (claims
    # far from the limits, single admissions near them), keeping every lease: never over the
    # limit; short of it by at most what the processes claimed and never handed out.
    admitted = run_burst(spec, 1000, 2000, processes=4, tries=400)
    slack = 0 if spec[0] == "redis" else 4 * (MAX_CLAIM - 1)
    assert 1000 - slack <= admitted <= 1000
    if spec[0] != "redis":
        times, live = _store(build(spec))
        assert len(times) == live == 1000  # every admission counted, the limit reached exactly
