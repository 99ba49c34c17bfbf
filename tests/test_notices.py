"""Change notices (proxy_app/notices.py): a ChangeWatcher thread polling ``proxy_changes``
on a real SQLite file and a real PostgreSQL (stopped and started again for the outages)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from proxy_app import key_store
from proxy_app import migrate
from proxy_app.keys import key_name
from proxy_app.keys import token_of
from proxy_app.notices import POLL_SECONDS
from proxy_app.notices import ChangeWatcher
from proxy_app.store import make_engine

# A key change must reach every worker within 2 s; one poll interval plus a read is the budget.
NOTICE_SECONDS = 1.5
FAST = 0.05  # the poll interval of the tests that are about something else than the delay


class Calls:
    """A listener that counts its calls, thread-safe."""

    def __init__(self):
        self.count = 0
        self._changed = threading.Condition()

    def reset(self) -> None:
        with self._changed:
            self.count = 0

    def __call__(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


def wait_until(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def bump(engine, name="keys") -> None:
    with engine.begin() as conn:
        key_store.bump(conn, name)


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(None, {"STATE_DIRECTORY": str(tmp_path)})
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def watching():
    """``watching(engine, listeners, interval)``: a started watcher, stopped after the test."""
    started = []

    def start(engine, listeners, interval=FAST):
        watcher = ChangeWatcher(engine, listeners, interval=interval)
        watcher.start()
        started.append(watcher)
        # The first poll has happened once the watcher knows where the counter stands. It
        # called every listener once (test_the_first_poll_calls_each_listener_once); the
        # tests count from there.
        assert wait_until(lambda: set(listeners) <= set(watcher.seen), 5.0), "no first poll within 5 s"
        for listener in listeners.values():
            if isinstance(listener, Calls):
                listener.reset()
        return watcher

    yield start
    for watcher in started:
        watcher.stop()
        watcher._thread.join(timeout=5.0)


def test_the_first_poll_calls_each_listener_once(engine):
    """A change between a worker's first read (its stored endpoints, at start) and the first
    poll would otherwise go unseen: the first poll calls every listener, later ones only
    those whose counter moved."""
    bump(engine)
    bump(engine)
    keys_calls, other_calls = Calls(), Calls()
    watcher = ChangeWatcher(engine, {"keys": keys_calls, "endpoints": other_calls}, interval=FAST)
    watcher.start()
    try:
        assert keys_calls.wait_for(1, 5.0) and other_calls.wait_for(1, 5.0), "the first poll called no listener"
        time.sleep(FAST * 6)
        assert (keys_calls.count, other_calls.count) == (1, 1)
    finally:
        watcher.stop()
        watcher._thread.join(timeout=5.0)


def test_a_bump_calls_the_listener_within_a_poll(engine, watching):
    calls = Calls()
    watcher = watching(engine, {"keys": calls}, interval=POLL_SECONDS)
    assert watcher.interval <= 0.5
    for n in range(1, 4):
        bump(engine)
        started = time.monotonic()
        assert calls.wait_for(n, NOTICE_SECONDS), f"change {n} not seen within {NOTICE_SECONDS} s"
        assert time.monotonic() - started < NOTICE_SECONDS
    assert calls.count == 3


def test_a_key_change_through_the_store_calls_the_listener(engine, watching):
    calls = Calls()
    watching(engine, {"keys": calls})
    record = key_store.create_key(engine, token_of("sk-n-1"), key_name("sk-n-1"), {}, {}, time.time())
    assert calls.wait_for(1, NOTICE_SECONDS)
    key_store.set_blocked(engine, record.token, True, time.time())
    assert calls.wait_for(2, NOTICE_SECONDS)
    key_store.delete_keys(engine, [record.token])
    assert calls.wait_for(3, NOTICE_SECONDS)


def test_a_rolled_back_change_calls_nothing(engine, watching):
    calls = Calls()
    watching(engine, {"keys": calls})
    with pytest.raises(RuntimeError), engine.begin() as conn:
        key_store.bump(conn, "keys")
        raise RuntimeError("roll it back")
    time.sleep(FAST * 8)
    assert calls.count == 0


def test_only_the_listener_of_the_counter_that_moved_is_called(engine, watching):
    keys_calls, other_calls = Calls(), Calls()
    watching(engine, {"keys": keys_calls, "endpoints": other_calls})
    bump(engine, "endpoints")
    assert other_calls.wait_for(1, NOTICE_SECONDS)
    time.sleep(FAST * 4)
    assert keys_calls.count == 0


def test_stop_ends_the_thread(engine):
    watcher = ChangeWatcher(engine, {"keys": Calls()}, interval=FAST)
    watcher.start()
    assert wait_until(lambda: "keys" in watcher.seen, 5.0)
    watcher.stop()
    watcher._thread.join(timeout=FAST + 2.0)
    assert not watcher._thread.is_alive()


def test_stop_is_prompt_even_with_a_long_interval(engine):
    watcher = ChangeWatcher(engine, {"keys": Calls()}, interval=30.0)
    watcher.start()
    assert wait_until(lambda: "keys" in watcher.seen, 5.0)
    started = time.monotonic()
    watcher.stop()
    watcher._thread.join(timeout=5.0)
    assert not watcher._thread.is_alive()
    assert time.monotonic() - started < 2.0


# --- outages (PostgreSQL) ---------------------------------------------------------------------


@pytest.fixture
def pg_engine(pg_url):
    engine = make_engine(pg_url, {})
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def test_unhealthy_while_the_database_is_down_then_notices_again(postgres, pg_engine, watching):
    calls = Calls()
    watcher = watching(pg_engine, {"keys": calls})
    assert watcher.healthy
    postgres.stop()
    try:
        assert wait_until(lambda: not watcher.healthy, 10.0), "still healthy 10 s after PostgreSQL stopped"
        assert watcher.stale
        assert calls.count == 0
    finally:
        postgres.start()
    assert wait_until(lambda: watcher.healthy, 15.0), "not healthy 15 s after PostgreSQL started"
    # The watcher goes on: a change after the outage reaches the listener.
    before = calls.count
    bump(pg_engine)
    assert calls.wait_for(before + 1, NOTICE_SECONDS)


def test_the_cache_is_dropped_when_an_outage_ends(postgres, pg_engine, watching):
    """Nothing can be seen while the database is away, so whatever was cached is dropped on
    the first poll that succeeds again (proxy_app/notices.py, ChangeWatcher._failed)."""
    calls = Calls()
    watcher = watching(pg_engine, {"keys": calls})
    postgres.stop()
    try:
        assert wait_until(lambda: not watcher.healthy, 10.0)
    finally:
        postgres.start()
    assert wait_until(lambda: watcher.healthy, 15.0)
    assert calls.wait_for(1, NOTICE_SECONDS), "listener not called after the outage ended"
    assert not watcher.stale


def test_a_change_missed_during_an_outage_calls_the_listener(postgres, pg_url, pg_engine, watching):
    """An outage for this worker only: its database refuses new connections while another
    session (already connected) changes a key; the change is noticed once it is back."""
    calls = Calls()
    watcher = watching(pg_engine, {"keys": calls})
    database = pg_engine.url.database
    admin = make_engine(postgres.url, {})
    writer = make_engine(pg_url, {})
    try:
        with writer.connect() as held:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db AND pid <> :mine"),
                    {"db": database, "mine": held.connection.dbapi_connection.info.backend_pid},
                )
                conn.commit()
            try:
                assert wait_until(lambda: not watcher.healthy, 10.0), "the watcher did not notice the outage"
                with held.begin():
                    key_store.bump(held, "keys")
                time.sleep(FAST * 4)
                assert calls.count == 0
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
                    conn.commit()
        assert wait_until(lambda: watcher.healthy, 15.0)
        assert calls.wait_for(1, NOTICE_SECONDS)
    finally:
        writer.dispose()
        admin.dispose()
