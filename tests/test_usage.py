"""The usage writer (proxy_app/usage.py) against real SQLite files and a real PostgreSQL server.

No store is mocked: a database that is "down" is a PostgreSQL server stopped by its PID, a
SQLite file in a directory that does not exist, or a SQLite file another connection holds
locked. Every wait is bounded (``wait_for``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import insert
from sqlalchemy import select

from proxy_app.migrate import upgrade
from proxy_app.schema import keys
from proxy_app.schema import spend_logs
from proxy_app.store import make_engine
from proxy_app.usage import BadRow
from proxy_app.usage import UsageWriter
from proxy_app.usage import normalize
from proxy_app.usage import spend_of
from tests.gunicorn_proc import wait_until

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # seconds any condition below may take


def wait_for(condition, timeout: float = WAIT, what: str = "condition"):
    return wait_until(condition, timeout, what)


def row(request_id: str, api_key: str | None = None, spend: float = 0.0, **fields) -> dict:
    now = time.time()
    return {
        "request_id": request_id,
        "api_key": api_key,
        "key_alias": None,
        "route": "/v1/rerank",
        "method": "POST",
        "status": 200,
        "request_bytes": 10,
        "response_bytes": 20,
        "duration_ms": 1.5,
        "ttfb_ms": 1.0,
        "spend": spend,
        "start_time": now - 0.0015,
        "end_time": now,
        "upstream_error": None,
        **fields,
    }


def sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def written() -> float:
    return sample("proxy_usage_rows_written_total")


def dropped() -> float:
    return sample("proxy_usage_rows_dropped_total")


def held_gauge() -> float:
    return sample("proxy_usage_rows_held")


def count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(spend_logs)).scalar_one()


def request_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(spend_logs.c.request_id)).scalars())


def add_key(engine, token: str, spend: float = 0.0, budget_duration: str | None = None, budget_reset_at: float | None = None):
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            insert(keys).values(
                token=token,
                key_name="sk-...abcd",
                spend=spend,
                budget_duration=budget_duration,
                budget_reset_at=budget_reset_at,
                blocked=False,
                created_at=now,
                updated_at=now,
            )
        )


def key_state(engine, token: str) -> tuple[float, float | None]:
    with engine.connect() as conn:
        found = conn.execute(select(keys.c.spend, keys.c.budget_reset_at).where(keys.c.token == token)).one()
    return found.spend, found.budget_reset_at


def spool_files(spool: Path) -> list[Path]:
    return sorted(spool.glob("usage-*.jsonl")) if spool.exists() else []


def spooled_rows(spool: Path) -> list[dict]:
    return [json.loads(line) for path in spool_files(spool) for line in path.read_text().splitlines()]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'proxy_app.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'proxy_app.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def unreachable_engine(tmp_path):
    # The file's directory does not exist: every connect fails (sqlite3.OperationalError).
    return make_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'proxy_app.db'}")


# -- pure rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 0.25),
        ("0.0123", 0.0123),
        (" 0.5 ", 0.5),
        ("0", 0.0),
        ("3", 3.0),
        (".5", 0.5),
        ("1e-3", 0.001),
        ("2E2", 200.0),
        ("", 0.25),
        ("-0.1", 0.25),
        ("-0", 0.25),
        ("+1", 0.25),
        ("nan", 0.25),
        ("NaN", 0.25),
        ("inf", 0.25),
        ("Infinity", 0.25),
        ("1e999", 0.25),
        ("1_000", 0.25),
        ("0x10", 0.25),
        ("None", 0.25),
        ("\u0661", 0.25),  # ARABIC-INDIC DIGIT ONE: float() takes it, a header value must not
        ("1.2.3", 0.25),
        ("12abc", 0.25),
    ],
)
def test_spend_of(header, expected):
    assert spend_of(header, 0.25) == expected


def test_normalize_fills_absent_columns_and_converts_types():
    given = row("r1", spend=1)
    del given["ttfb_ms"]
    given["status"] = "200"
    given["extra_field"] = "ignored"
    out = normalize(given)
    assert set(out) == {column.name for column in spend_logs.columns}
    assert out["ttfb_ms"] is None
    assert out["status"] == 200
    assert out["spend"] == 1.0
    assert type(out["spend"]) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"request_id": None}, "request_id is missing"),
        ({"method": None}, "method is missing"),
        ({"status": "two hundred"}, "status is not int"),
        ({"spend": float("nan")}, "spend is not finite"),
        ({"duration_ms": "inf"}, "duration_ms is not finite"),
        ({"start_time": [1]}, "start_time is not float"),
    ],
)
def test_normalize_refuses_malformed_rows(change, message):
    with pytest.raises(BadRow, match=message):
        normalize({**row("r1"), **change})


# -- writing ---------------------------------------------------------------------------------------


def test_rows_written_in_batches_and_visible(engine, tmp_path):
    # interval 30 s: only a full batch can wake the writer within the wait below.
    writer = UsageWriter(engine, str(tmp_path / "spool"), batch_size=50, interval=30)
    before = written()
    writer.start()
    try:
        for i in range(120):
            writer.add(row(f"req-{i:04d}"))
        wait_for(lambda: count(engine) >= 100, timeout=5, what="two full batches, long before the interval")
    finally:
        writer.stop(10)
    assert count(engine) == 120  # stop() wrote the partial batch
    assert written() - before == 120
    assert writer.held() == 0
    assert spool_files(tmp_path / "spool") == []
    # No lock file left behind by a writer that held nothing.
    assert not list((tmp_path / "spool").glob("owner-*")) if (tmp_path / "spool").exists() else True


def test_interval_writes_a_partial_batch(engine, tmp_path):
    writer = UsageWriter(engine, str(tmp_path / "spool"), batch_size=500, interval=0.1)
    writer.start()
    try:
        writer.add(row("lonely"))
        wait_for(lambda: count(engine) == 1, timeout=5, what="the interval's write")
    finally:
        writer.stop(10)


def test_spend_added_once_per_row_and_reset_by_budget_duration(engine, tmp_path):
    now = time.time()
    add_key(engine, "plain", spend=1.0)
    add_key(engine, "due", spend=5.0, budget_duration="1h", budget_reset_at=now - 10)
    add_key(engine, "running", spend=1.0, budget_duration="1h", budget_reset_at=now + 100)
    add_key(engine, "unstarted", spend=2.0, budget_duration="30s", budget_reset_at=None)
    add_key(engine, "cleared", spend=3.0, budget_duration=None, budget_reset_at=now - 10)
    writer = UsageWriter(engine, str(tmp_path / "spool"), batch_size=4)
    rows = [
        row("p1", "plain", 0.5),
        row("p2", "plain", 0.5),
        row("p3", "plain", 0.5),
        row("d1", "due", 0.25),
        row("d2", "due", 0.25),
        row("r1", "running", 0.5),
        row("u1", "unstarted", 0.5),
        row("c1", "cleared", 0.5),
        row("m1", "master", 9.0),
        row("o1", None, 9.0),
        row("x1", "no-such-token", 9.0),
        row("z1", "plain", 0.0),
    ]
    for item in rows:
        writer.add(item)
    writer.flush()
    after = time.time()
    assert count(engine) == len(rows)
    assert key_state(engine, "plain") == (2.5, None)
    spend, reset_at = key_state(engine, "due")
    assert spend == 0.5
    assert now + 3600 <= reset_at <= after + 3600
    assert key_state(engine, "running") == (1.5, now + 100)
    spend, reset_at = key_state(engine, "unstarted")
    assert spend == 2.5
    assert now + 30 <= reset_at <= after + 30
    assert key_state(engine, "cleared") == (3.5, None)

    # The same request ids again (a retry of rows already written): nothing inserted, no spend.
    before = written()
    for item in rows:
        writer.add(dict(item, spend=100.0))
    writer.flush()
    writer.stop(10)
    assert count(engine) == len(rows)
    assert written() == before
    assert key_state(engine, "plain") == (2.5, None)
    assert key_state(engine, "due")[0] == 0.5


def test_duplicate_request_id_within_one_batch_counts_once(engine, tmp_path):
    add_key(engine, "tok")
    writer = UsageWriter(engine, str(tmp_path / "spool"))
    writer.add(row("same", "tok", 1.0))
    writer.add(row("same", "tok", 1.0))
    writer.add(row("other", "tok", 1.0))
    writer.stop(10)
    assert request_ids(engine) == ["other", "same"]
    assert key_state(engine, "tok")[0] == 2.0


def test_spooled_batch_retried_after_an_ambiguous_failure_adds_nothing_twice(engine, tmp_path):
    # The commit reached the database but its answer was lost: the batch is in the spool as well.
    add_key(engine, "tok")
    spool = tmp_path / "spool"
    writer = UsageWriter(engine, str(spool))
    writer.add(row("a", "tok", 1.0))
    writer.add(row("b", "tok", 1.0))
    writer.flush()
    assert key_state(engine, "tok")[0] == 2.0
    spool.mkdir(exist_ok=True)
    # A file of a writer that died (no lock held), holding the two committed rows and a new one.
    lines = [normalize(row(r, "tok", 1.0)) for r in ("a", "b", "c")]
    name = f"usage-999.dead-{time.time_ns():020d}-abcd1234-3.jsonl"
    (spool / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    writer.flush()
    writer.stop(10)
    assert request_ids(engine) == ["a", "b", "c"]
    assert key_state(engine, "tok")[0] == 3.0
    assert spool_files(spool) == []
    assert list(spool.iterdir()) == []


# -- the database unreachable ----------------------------------------------------------------------


def test_stop_with_the_database_down_spools_every_row(tmp_path, sqlite_url, caplog):
    spool = tmp_path / "spool"
    errors = sample("proxy_store_errors_total", {"store": "database", "operation": "usage"})
    writer = UsageWriter(unreachable_engine(tmp_path), str(spool), batch_size=10)
    with caplog.at_level(logging.WARNING, logger="proxy_app"):
        for i in range(25):
            writer.add(row(f"r{i:02d}", "tok", 0.5))
        writer.stop(5)
    assert sorted(item["request_id"] for item in spooled_rows(spool)) == [f"r{i:02d}" for i in range(25)]
    assert [len(p.read_text().splitlines()) for p in spool_files(spool)] == [10, 10, 5]
    assert sample("proxy_store_errors_total", {"store": "database", "operation": "usage"}) > errors
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot write usage rows" in r.getMessage()]
    assert len(warnings) == 1  # at most once a minute
    assert "no-such-dir" in warnings[0].getMessage()
    # The stopped writer's lock is free: a writer in another process adopts and writes the rows.
    engine = make_engine(sqlite_url)
    add_key(engine, "tok")
    run_writer_process(sqlite_url, spool)
    assert count(engine) == 25
    assert key_state(engine, "tok")[0] == 12.5
    assert list(spool.iterdir()) == []
    engine.dispose()


WRITER_PROCESS = textwrap.dedent(
    """
    import pathlib, sys, time
    from proxy_app.store import make_engine
    from proxy_app.usage import UsageWriter
    url, spool, mode = sys.argv[1:4]
    writer = UsageWriter(make_engine(url), spool, batch_size=10, interval=0.05)
    if mode == "drain":
        writer.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and list(pathlib.Path(spool).glob("usage-*")):
            time.sleep(0.05)  # the writer adopts the files, writes them and deletes them
        writer.stop(10)
        print("HELD", writer.held(), flush=True)
    else:  # "hold": spool rows, keep the owner lock until killed
        for i in range(20):
            writer.add({"request_id": f"held-{i}", "method": "POST", "status": 200, "request_bytes": 1,
                        "response_bytes": 1, "duration_ms": 1.0, "spend": 0.0, "start_time": 1.0, "end_time": 2.0})
        writer.flush()
        print("SPOOLED", writer.spooled(), flush=True)
        time.sleep(60)
    """
)


def run_writer_process(url: str, spool: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WRITER_PROCESS, url, str(spool), "drain"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "HELD 0" in done.stdout, done.stdout + done.stderr


def test_files_of_a_running_writer_are_left_alone_until_it_dies(tmp_path, sqlite_url):
    spool = tmp_path / "spool"
    bad_url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITER_PROCESS, bad_url, str(spool), "hold"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    engine = make_engine(sqlite_url)
    writer = UsageWriter(engine, str(spool))
    try:
        assert holder.stdout.readline().strip() == "SPOOLED 20"
        writer.flush()
        assert count(engine) == 0  # its owner lock is held: not ours to write
        assert writer.spooled() == 0
        assert len(spooled_rows(spool)) == 20
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        writer.flush()
        assert count(engine) == 20
        assert list(spool.iterdir()) == [] or [p.name for p in spool.iterdir()] == [f"owner-{writer._owner}.lock"]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        writer.stop(10)
        engine.dispose()
    assert list(spool.iterdir()) == []


def test_rows_beyond_max_held_are_dropped_and_counted(tmp_path, caplog):
    spool = tmp_path / "spool"
    writer = UsageWriter(unreachable_engine(tmp_path), str(spool), batch_size=4, max_held=10)
    before = dropped()
    for i in range(15):
        writer.add(row(f"r{i}"))
    assert dropped() - before == 5
    with caplog.at_level(logging.ERROR, logger="proxy_app"):
        writer.flush()  # to the spool: still held, still counted against the bound
    assert writer.spooled() == 10
    assert held_gauge() >= 10
    writer.add(row("late"))
    assert dropped() - before == 6
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("dropped 5 usage rows" in message and "'r10'" in message for message in errors), errors
    writer.stop(5)
    # The oldest rows are kept: the first ten.
    assert sorted(item["request_id"] for item in spooled_rows(spool)) == sorted(f"r{i}" for i in range(10))


def test_a_locked_sqlite_file_spools_then_writes_when_released(tmp_path, sqlite_url):
    path = sqlite_url.removeprefix("sqlite:///")
    # A short busy timeout, so the lock shows as a failure within the test.
    engine = create_engine(sqlite_url, connect_args={"timeout": 0.2})
    spool = tmp_path / "spool"
    writer = UsageWriter(engine, str(spool))
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        writer.add(row("while-locked"))
        writer.flush()
        assert writer.spooled() == 1
        locker.execute("ROLLBACK")
        writer.flush()
        assert request_ids(engine) == ["while-locked"]
        assert writer.spooled() == 0
    finally:
        locker.close()
        writer.stop(5)
        engine.dispose()


def test_stop_while_the_database_hangs_puts_every_row_on_disk(tmp_path, sqlite_url):
    # The store's engine waits up to 5 s for a lock (busy timeout): longer than the stop timeout.
    engine = make_engine(sqlite_url)
    spool = tmp_path / "spool"
    writer = UsageWriter(engine, str(spool), batch_size=10, interval=0.05)
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer.start()
    thread = writer._thread
    try:
        for i in range(25):
            writer.add(row(f"r{i:02d}"))
        time.sleep(0.3)  # the thread is inside an INSERT, waiting for the lock
        started = time.monotonic()
        writer.stop(1.0)
        assert time.monotonic() - started < 2.0
        assert thread.is_alive()
        # Every row is on disk (the batch in hand possibly twice: written once, see below).
        assert {item["request_id"] for item in spooled_rows(spool)} == {f"r{i:02d}" for i in range(25)}
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    thread.join(15)
    assert not thread.is_alive()
    # The thread handed its spool over when it ended: another writer writes it, once.
    run_writer_process(sqlite_url, spool)
    assert request_ids(engine) == [f"r{i:02d}" for i in range(25)]
    assert list(spool.iterdir()) == []
    engine.dispose()


def test_postgresql_stopped_mid_run_loses_and_doubles_nothing(postgres, pg_url, tmp_path):
    engine = make_engine(pg_url)
    upgrade(engine)
    add_key(engine, "tok")
    spool = tmp_path / "spool"
    before = written()
    writer = UsageWriter(engine, str(spool), batch_size=20, interval=0.05)
    writer.start()
    try:
        for i in range(50):
            writer.add(row(f"before-{i}", "tok", 0.01))
        wait_for(lambda: count(engine) == 50, what="the rows before the outage")

        postgres.stop()
        for i in range(100):
            writer.add(row(f"during-{i}", "tok", 0.01))
            if i % 25 == 0:
                time.sleep(0.1)  # across several writer cycles
        wait_for(lambda: writer.spooled() == 100, what="the rows in the spool")
        assert len(spooled_rows(spool)) == 100
        assert held_gauge() >= 100

        postgres.start()
        wait_for(lambda: writer.held() == 0, what="the spooled rows written")
        writer.add(row("after", "tok", 0.01))
        wait_for(lambda: count(engine) == 151, what="the row after the outage")
    finally:
        writer.stop(10)
    ids = request_ids(engine)
    assert len(ids) == len(set(ids)) == 151
    assert key_state(engine, "tok")[0] == pytest.approx(1.51)
    assert written() - before == 151
    assert spool_files(spool) == []
    assert held_gauge() == 0
    engine.dispose()


def test_postgresql_down_at_stop_then_the_next_writer_writes_the_spool(postgres, pg_url, tmp_path):
    engine = make_engine(pg_url)
    upgrade(engine)
    add_key(engine, "tok")
    spool = tmp_path / "spool"
    writer = UsageWriter(engine, str(spool), interval=0.05)
    writer.start()
    postgres.stop()
    for i in range(30):
        writer.add(row(f"r{i}", "tok", 1.0))
    writer.stop(8)  # a graceful stop (HUP, TERM) with the database away
    assert len(spooled_rows(spool)) == 30
    engine.dispose()

    postgres.start()
    run_writer_process(pg_url, spool)
    engine = make_engine(pg_url)
    assert count(engine) == 30
    assert key_state(engine, "tok")[0] == 30.0
    assert list(spool.iterdir()) == []
    engine.dispose()


def test_writers_in_several_processes_add_every_spend(tmp_path, engine):
    add_key(engine, "tok")
    url = engine.url.render_as_string(hide_password=False)
    script = textwrap.dedent(
        """
        import sys
        from proxy_app.store import make_engine
        from proxy_app.usage import UsageWriter
        url, spool, prefix = sys.argv[1:4]
        writer = UsageWriter(make_engine(url), spool, batch_size=7, interval=0.01)
        writer.start()
        for i in range(200):
            writer.add({"request_id": f"{prefix}-{i}", "api_key": "tok", "method": "POST", "status": 200,
                        "request_bytes": 1, "response_bytes": 1, "duration_ms": 1.0, "spend": 0.5,
                        "start_time": 1.0, "end_time": 2.0})
        writer.stop(20)
        print("HELD", writer.held())
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url, str(tmp_path / "spool"), f"p{n}"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "HELD 0" in out
    assert count(engine) == 600
    assert key_state(engine, "tok")[0] == 300.0


def test_add_cost(tmp_path, sqlite_url):
    # Printed, not asserted: the machine's speed varies. Run with -s to see it.
    engine = make_engine(sqlite_url)
    n = 50_000
    items = [row(f"r{i}") for i in range(n)]
    writer = UsageWriter(engine, str(tmp_path / "spool"), max_held=10**9, batch_size=10**9)
    started = time.perf_counter_ns()
    for item in items:
        writer.add(item)
    fast = (time.perf_counter_ns() - started) / n
    # The writer's own work per row (normalize, insert, commit), in its thread in production.
    started = time.perf_counter_ns()
    writer.flush(60)
    behind = (time.perf_counter_ns() - started) / n
    assert count(engine) == n
    writer.stop(10)
    # add() while the writer thread writes: the GIL is shared, so this includes part of its work.
    items = [row(f"s{i}") for i in range(n)]
    writer = UsageWriter(engine, str(tmp_path / "spool"), max_held=10**9, batch_size=500, interval=0.5)
    writer.start()
    started = time.perf_counter_ns()
    for item in items:
        writer.add(item)
    running = (time.perf_counter_ns() - started) / n
    writer.stop(60)
    assert count(engine) == 2 * n
    print(f"\nadd(): {fast:.0f} ns; writing (SQLite): {behind:.0f} ns per row; add() beside a running writer: {running:.0f} ns")
    engine.dispose()
