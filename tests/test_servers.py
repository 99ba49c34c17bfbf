"""The test servers of tests/servers.py: they start, answer, stop, and come back on the same port."""

from __future__ import annotations

import os

import psycopg
import pytest
import redis

from tests import servers

# The fixtures postgres, pg_url, redis_server and redis_url (registering the module as a plugin
# rather than importing the fixtures keeps ruff's F811 quiet about the test arguments).


def _pg_pid(url: str) -> int:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_postgres_stops_and_restarts_on_the_same_port_keeping_data(postgres, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (42)")
    port, pid = postgres.port, postgres.proc.pid
    postgres.stop()
    assert not postgres.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_url, connect_timeout=2)
    postgres.start()
    assert postgres.port == port and postgres.proc.pid != pid
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [(42,)]


def test_each_test_gets_a_fresh_database(postgres, pg_url):
    assert pg_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/test_")
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()[0]
    assert tables == 0
    assert _pg_pid(pg_url) > 0


def test_postgres_runs_unprivileged(postgres):
    with open(f"/proc/{postgres.proc.pid}/status") as status:
        uid = next(line.split()[1] for line in status if line.startswith("Uid:"))
    assert int(uid) != 0 or os.geteuid() != 0


def test_redis_stops_and_restarts_on_the_same_port(redis_server, redis_url):
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    client.set("k", "v")
    port = redis_server.port
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        client.get("k")
    redis_server.start()
    assert redis_server.port == port
    assert client.get("k") is None  # no persistence: a restart starts empty
    client.close()


def test_redis_url_is_flushed_before_each_test(redis_url):
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    assert client.dbsize() == 0
    client.set("left-behind", "1")
    client.close()


def test_redis_url_is_flushed_before_each_test_again(redis_url):
    test_redis_url_is_flushed_before_each_test(redis_url)


def test_a_missing_postgresql_fails_naming_the_package(monkeypatch):
    monkeypatch.setattr(servers.glob, "glob", lambda pattern: [])
    with pytest.raises(servers.ServerMissing, match=r"apt-get install -y postgresql"):
        servers.start_postgres()


def test_a_missing_redis_fails_naming_the_package(monkeypatch):
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    with pytest.raises(servers.ServerMissing, match=r"apt-get install -y redis-server"):
        servers.start_redis()
