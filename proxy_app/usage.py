"""Usage rows: written off the request path, in batches, and never lost on a graceful stop.

A request adds its row with :meth:`UsageWriter.add` (a deque append: no lock, no I/O) and a
daemon thread writes what has accumulated every ``interval`` seconds, or as soon as
``batch_size`` rows wait. A batch is one transaction: the rows are inserted with ``ON CONFLICT
(request_id) DO NOTHING ... RETURNING`` and the spend of the rows *that insert really inserted*
is added to their keys. A batch retried after an ambiguous failure (the commit reached the
database but its answer did not reach us) therefore inserts nothing twice and adds no spend
twice: the retry is always safe, so every failure path retries rather than guesses.

While the database is unreachable the batches go to the spool directory, one JSON-lines file per
batch (written to a temporary name, fsynced, then renamed, so a crash never leaves half a file),
and are written back, oldest first, when the database answers again. Memory plus spool is
bounded by ``max_held`` rows; beyond it new rows are dropped and counted
(``proxy_usage_rows_dropped_total``), the newest rather than the oldest because the oldest
already sit on disk and dropping them would cost a rewrite.

Several processes share one spool directory (gunicorn workers, and the workers that replace
them after a HUP). Each writer holds an ``fcntl.flock`` on its own ``owner-<id>.lock`` file for as
long as it runs, and names its spool files after that id. A writer that finds files of an owner
whose lock it can take (the owner stopped or died: the kernel drops the lock with the process)
adopts them by renaming them to its own id, atomically, so two writers never write one file.
A file is deleted only after its rows are committed.

Metrics: the writer's thread moves ``proxy_usage_rows_held`` (memory plus this writer's spool)
once a cycle rather than add() once a row, which keeps a lock out of the request path; a stopped
writer takes its spooled rows out of the gauge, and the writer that adopts them puts them back.
A spool that cannot be written (disk full, permissions) counts as
``proxy_store_errors_total{store="spool",operation="usage"}`` and keeps the rows in memory.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import math
import os
import re
import secrets
import threading
import time

from sqlalchemy import Float
from sqlalchemy import Integer
from sqlalchemy import and_
from sqlalchemy import or_
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.exc import DataError
from sqlalchemy.exc import IntegrityError

from proxy_app import metrics
from proxy_app.keys import parse_duration
from proxy_app.logs import Throttle
from proxy_app.schema import keys
from proxy_app.schema import spend_logs
from proxy_app.store import describe

log = logging.getLogger("proxy_app")

WARN_EVERY = 60.0  # seconds between two WARNINGs about the unreachable database
RETRY_FIRST = 1.0  # seconds before the first retry of an unreachable database, doubled up to:
RETRY_MAX = 5.0
SCAN_EVERY = 5.0  # seconds between two looks for files that stopped writers left behind
DRAIN_SECONDS = 2.0  # per cycle, so that spooled rows never hold back the new ones for long
OWNER_ATTEMPTS = 5  # tries to create a lock file nobody unlinked under us (see _lock_owner)

# The DB-API placeholder of each supported driver (sqlite3: qmark; psycopg: format).
_PLACEHOLDERS = {"sqlite": "?", "postgresql": "%s"}
# Rows per INSERT statement: 14 parameters a row stays under SQLite's 32766 and PostgreSQL's
# 65535 parameters per statement.
ROWS_PER_STATEMENT = 1000
# One JSON-number, ASCII only: float() alone also takes "1_0", "nan", "inf" and non-ASCII digits.
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def spend_of(header_value: str | None, cost_per_request: float) -> float:
    """The spend of one request: the upstream's ``x-litellm-response-cost`` when it is a valid,
    finite, non-negative number, else the endpoint's ``cost_per_request``."""
    if header_value is not None:
        text = header_value.strip()
        if _NUMBER.fullmatch(text):
            cost = float(text)
            if math.isfinite(cost):
                return cost
    return cost_per_request


def _column_rules():
    # (name, type to coerce to, required, longest text) per spend_logs column, in table order.
    rules = []
    for column in spend_logs.columns:
        if isinstance(column.type, Integer):
            kind = int
        elif isinstance(column.type, Float):
            kind = float
        else:
            kind = str
        rules.append((column.name, kind, not column.nullable, getattr(column.type, "length", None)))
    return tuple(rules)


_RULES = _column_rules()
COLUMNS = tuple(rule[0] for rule in _RULES)


def insert_sql(dialect, rows: int) -> str:
    """One INSERT of ``rows`` rows that skips request ids already present and answers the
    api_key and spend of the rows it inserted.

    Written out rather than built with SQLAlchemy's insert(): SQLAlchemy's executemany with
    RETURNING ("insertmanyvalues") spends about 20 µs of Python per row on this 14-column table,
    three times the database's own work, in a thread that shares the GIL with the requests.
    ``ON CONFLICT ... DO NOTHING ... RETURNING`` is the same on both databases (SQLite >= 3.35).
    """
    quote = dialect.identifier_preparer.quote
    one = "(" + ", ".join([_PLACEHOLDERS[dialect.name]] * len(COLUMNS)) + ")"
    return (
        f"INSERT INTO {quote(spend_logs.name)} ({', '.join(quote(name) for name in COLUMNS)}) "
        f"VALUES {', '.join([one] * rows)} "
        f"ON CONFLICT ({quote('request_id')}) DO NOTHING RETURNING {quote('api_key')}, {quote('spend')}"
    )


# The usage row's api_key for a caller that presented the master key (LiteLLM has no token
# for it either); never a key whose spend is tracked.
MASTER = "master"


class BadRow(ValueError):
    pass


class Row(dict):
    """A usage row the proxy built itself (proxy_app/observe.py): every column present, each
    of its column's type, so :func:`normalize` is skipped for it (about 2 µs a row)."""

    __slots__ = ()


def normalize(row: dict) -> dict:
    """The row as the table takes it: every column present, each value of its column's type.

    A malformed row is refused here (:class:`BadRow`) rather than by the database, where it
    would fail its whole batch, again at every retry.
    """
    out = {}
    for name, kind, required, length in _RULES:
        value = row.get(name)
        if value is None:
            if required:
                raise BadRow(f"{name} is missing")
            out[name] = None
            continue
        if type(value) is not kind:
            try:
                value = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise BadRow(f"{name} is not {kind.__name__}") from None
        if kind is float:
            if not math.isfinite(value):
                raise BadRow(f"{name} is not finite")
        elif length is not None and len(value) > length:
            value = value[:length]
        out[name] = value
    return out


class UsageWriter:
    """Writes usage rows (``schema.spend_logs``) in batches, from a thread of its own."""

    def __init__(self, engine, spool_dir: str, *, batch_size: int = 500, interval: float = 0.5, max_held: int = 100_000):
        dialect = engine.dialect.name
        if dialect not in _PLACEHOLDERS:
            raise ValueError(f"usage rows: unsupported database {dialect!r}")
        self._engine = engine
        self._spool_dir = os.path.abspath(spool_dir)
        self._batch_size = batch_size
        self._interval = interval
        self._max_held = max_held
        # For logs: the database without its password (in the userinfo or the query string).
        self._database = describe(engine.url.render_as_string(hide_password=False))
        self._dialect = engine.dialect
        self._rows: collections.deque = collections.deque()
        self._wake = threading.Event()
        # Rows out of the deque but not yet committed: the batch in hand plus the spool's.
        # add() reads it for the max_held bound; only the writer's thread (or stop()) sets it.
        self._out = 0
        # add() appends without further checks while the deque is shorter than this: the
        # smaller of the batch size (then the writer is woken) and the room left under max_held.
        self._limit = min(batch_size, max_held)
        self._in_hand: list = []
        self._spool: dict[str, int] = {}  # our spool files: name -> rows
        self._reported = 0  # what this writer added to the USAGE_ROWS_HELD gauge
        self._drop_lock = threading.Lock()
        self._drops = 0
        self._drop_ids: list = []
        self._cycle_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._owner: str | None = None
        self._owner_lock = threading.Lock()  # stop() and the thread's end, for _hand_over
        self._thread_done = False
        self._abandoned = False
        self._owner_fd: int | None = None
        self._retry_at = 0.0  # monotonic; the database is known down until then
        self._retry_delay = RETRY_FIRST
        self._outage_log = Throttle(WARN_EVERY)
        self._down = False
        self._next_scan = 0.0

    # -- the request path ------------------------------------------------------------------

    def add(self, row: dict) -> None:
        """Queue one usage row; never blocks, never touches the database. Thread-safe."""
        rows = self._rows
        if len(rows) < self._limit:
            rows.append(row)
            return
        if len(rows) + self._out >= self._max_held:
            self._drop(row)
            return
        rows.append(row)
        if len(rows) >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    def _drop(self, row) -> None:
        metrics.USAGE_ROWS_DROPPED.inc()
        with self._drop_lock:
            self._drops += 1
            if len(self._drop_ids) < 3:
                self._drop_ids.append(row.get("request_id") if isinstance(row, dict) else None)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (in the process that will add rows: after a fork)."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread_done = False
        self._thread = threading.Thread(target=self._run, name="proxy-usage-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything held to the database, else to the spool; then stop the thread.

        Rows still in memory are never lost here: when the database does not answer in time,
        they go to the spool, where this process's successor (or any writer on the spool
        directory) picks them up.
        """
        deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is not None and thread.is_alive():
            # Keep part of the time for the spool, should the database take all the rest.
            self._stop_deadline = deadline - min(1.0, timeout / 5)
            self._stopping = True
            self._wake.set()
            thread.join(max(0.0, deadline - time.monotonic()))
            with self._owner_lock:
                if not self._thread_done:
                    # The thread still waits on the database: the rows go to disk now, and the
                    # thread hands the spool over when it ends (_run).
                    self._abandoned = True
                    self._rescue()
                    self._thread = None
                    return
        else:
            with self._cycle_lock:
                self._final(deadline)
        self._thread = None
        self._hand_over()

    def _hand_over(self) -> None:
        # Spooled files are the next writer's now (it adopts them and counts them as held).
        self._release_owner()
        metrics.USAGE_ROWS_HELD.dec(self._reported)
        self._reported = 0

    def flush(self, timeout: float = 10.0) -> None:
        """Run one writing cycle now, in the caller's thread (tests; the thread does the same)."""
        with self._cycle_lock:
            self._cycle(time.monotonic() + timeout, force=True)

    def held(self) -> int:
        """Rows in memory or in this writer's spool files."""
        return len(self._rows) + self._out

    def spooled(self) -> int:
        return sum(self._spool.values())

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopping:
                break
            with self._cycle_lock:
                try:
                    self._cycle(time.monotonic() + DRAIN_SECONDS)
                except Exception:
                    # A bug here must not end the thread and leave the rows unwritten.
                    log.exception("usage: writer cycle failed")
        with self._cycle_lock:
            self._final(self._stop_deadline)
        with self._owner_lock:
            self._thread_done = True
            if self._abandoned:
                self._hand_over()

    # -- the writer's thread -------------------------------------------------------------------

    def _cycle(self, deadline: float, force: bool = False) -> None:
        # Bounded: the rows present now, batch by batch; rows added meanwhile wait for the next cycle.
        for _ in range(len(self._rows) // self._batch_size + 1):
            batch = self._take()
            if not batch:
                continue
            if self._known_down() and not force:
                self._settle(batch)
                if not self._spool_rows(batch):
                    break
            else:
                self._deliver(batch)
        if not self._known_down() or force:
            now = time.monotonic()
            if now >= self._next_scan or force:
                self._next_scan = now + SCAN_EVERY
                self._adopt()
            if self._spool:
                self._drain(deadline)
        self._report()

    def _final(self, deadline: float) -> None:
        for _ in range(len(self._rows) // self._batch_size + 1):
            batch = self._take()
            if not batch:
                continue
            if self._known_down() or time.monotonic() >= deadline:
                self._settle(batch)
                if not self._spool_rows(batch):
                    break
            else:
                self._deliver(batch)
        if self._rows:
            # The spool failed too (disk full, no permission): these rows are lost.
            lost = len(self._rows)
            self._rows.clear()
            metrics.USAGE_ROWS_DROPPED.inc(lost)
            log.error(
                "usage: %d rows lost at stop: neither the database (%s) nor the spool (%s) took them", lost, self._database, self._spool_dir
            )
        if self._spool and not self._known_down():
            self._drain(deadline)
        self._report()

    def _rescue(self) -> None:
        # stop() timed out while the thread waits on the database: put on disk what it holds and
        # what is queued. Should the thread's insert commit after all, the spooled copy inserts
        # nothing when it is written back (ON CONFLICT DO NOTHING; spend from RETURNING).
        rows = list(self._in_hand)
        while self._rows:
            try:
                rows.append(normalize(self._rows.popleft()))
            except IndexError:
                break
            except BadRow:
                continue
        for start in range(0, len(rows), self._batch_size):
            self._spool_rows(rows[start : start + self._batch_size])
        log.warning("usage: the database (%s) did not answer within the stop timeout; %d rows held on disk", self._database, len(rows))
        self._report()

    def _take(self) -> list:
        rows = self._rows
        batch = []
        for _ in range(min(len(rows), self._batch_size)):
            row = rows.popleft()
            if type(row) is Row:
                batch.append(row)
                continue
            try:
                batch.append(normalize(row))
            except BadRow as exc:
                self._drop(row)
                log.error("usage: dropped a malformed row (request_id %r): %s", row.get("request_id"), exc)
        self._in_hand = batch
        self._count(len(batch))
        return batch

    def _settle(self, batch: list) -> None:
        # The batch in hand leaves the count: written, or about to be counted by the spool.
        self._count(-len(batch))
        self._in_hand = []

    def _deliver(self, batch: list) -> None:
        """Write one batch from memory: to the database, else to the spool."""
        left = self._commit(batch)
        self._settle(batch)
        if left:
            self._spool_rows(left)

    def _commit(self, rows: list) -> list:
        """Insert ``rows`` and add their spend; returns the rows left unwritten (database down)."""
        try:
            with self._engine.begin() as conn:
                inserted = self._write(conn, rows)
        except (IntegrityError, DataError) as exc:
            # normalize() refuses what it can; whatever else the database refuses is looked for
            # row by row, so that one bad row never holds back (or spools forever) the others.
            if len(rows) > 1:
                for index, row in enumerate(rows):
                    if self._commit([row]):
                        return rows[index:]
                return []
            metrics.USAGE_ROWS_DROPPED.inc()
            log.error("usage: the database refused a row (request_id %r): %s", rows[0]["request_id"], _first_line(exc))
            return []
        except Exception as exc:  # noqa: BLE001 - any failure of the database or its driver: hold the rows
            self._failed(exc)
            return rows
        self._succeeded(inserted)
        return []

    def _write(self, conn, rows: list) -> int:
        inserted = []
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            params = tuple([row[name] for row in chunk for name in COLUMNS])
            inserted += conn.exec_driver_sql(insert_sql(self._dialect, len(chunk)), params).all()
        added: dict[str, float] = {}
        for api_key, spend in inserted:
            if api_key is None or api_key == MASTER or not spend or spend < 0:
                continue
            added[api_key] = added.get(api_key, 0.0) + spend
        now = time.time()
        # In a fixed order: two writers updating the same keys never wait on each other in a cycle.
        for token in sorted(added):
            _add_spend(conn, token, added[token], now)
        return len(inserted)

    def _succeeded(self, inserted: int) -> None:
        if inserted:
            metrics.USAGE_ROWS_WRITTEN.inc(inserted)
        if self._down:
            self._down = False
            log.info("usage: the database (%s) answers again", self._database)
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST

    def _failed(self, exc: Exception) -> None:
        metrics.STORE_ERRORS.labels("database", "usage").inc()
        now = time.monotonic()
        self._down = True
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)
        if self._outage_log.due():
            log.warning(
                "usage: cannot write usage rows to the database (%s): %s: %s; holding them in %s",
                self._database,
                type(exc).__name__,
                _first_line(exc),
                self._spool_dir,
            )

    def _count(self, rows: int) -> None:
        self._out += rows
        self._limit = min(self._batch_size, self._max_held - self._out)

    def _known_down(self) -> bool:
        return time.monotonic() < self._retry_at

    def _report(self) -> None:
        held = len(self._rows) + self._out
        if held != self._reported:
            metrics.USAGE_ROWS_HELD.inc(held - self._reported)
            self._reported = held
        if self._drops:
            with self._drop_lock:
                drops, ids = self._drops, self._drop_ids
                self._drops, self._drop_ids = 0, []
            if drops:
                log.error(
                    "usage: dropped %d usage rows: %d rows already held (max_held %d) while the database (%s) is unreachable; "
                    "first request_id %s",
                    drops,
                    self.held(),
                    self._max_held,
                    self._database,
                    ", ".join(repr(i) for i in ids),
                )

    # -- the spool -------------------------------------------------------------------------

    def _spool_rows(self, rows: list) -> bool:
        """Hold ``rows`` (already counted out of memory) in a spool file; on failure put them
        back in memory and answer False."""
        try:
            self._lock_owner()
            uid = secrets.token_hex(4)
            temp = os.path.join(self._spool_dir, f".tmp-{self._owner}-{uid}")
            with open(temp, "w", encoding="utf-8") as file:
                for row in rows:
                    file.write(json.dumps(row, separators=(",", ":")))
                    file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            name = f"usage-{self._owner}-{time.time_ns():020d}-{uid}-{len(rows)}.jsonl"
            os.replace(temp, os.path.join(self._spool_dir, name))
            _fsync_dir(self._spool_dir)
        except OSError as exc:
            self._rows.extendleft(reversed(rows))
            metrics.STORE_ERRORS.labels("spool", "usage").inc()
            log.error("usage: cannot hold %d rows in the spool %s: %s; keeping them in memory", len(rows), self._spool_dir, exc)
            return False
        self._spool[name] = len(rows)
        self._count(len(rows))
        return True

    def _drain(self, deadline: float) -> None:
        """Write our spool files, oldest first, until one fails or ``deadline``."""
        written = 0
        for name in sorted(self._spool, key=_age):
            if time.monotonic() >= deadline:
                break
            path = os.path.join(self._spool_dir, name)
            rows = self._read(path)
            if rows is None:
                # Gone: nothing to write (cannot happen while we hold the owner lock).
                self._forget(name)
                continue
            if rows and self._commit(rows):
                # Left as it is: the rows it already committed insert nothing when it is retried.
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            written += len(rows)
            self._forget(name)
        if written:
            log.info("usage: wrote %d usage rows held on disk to the database (%s)", written, self._database)

    def _forget(self, name: str) -> None:
        self._count(-self._spool.pop(name, 0))

    def _read(self, path: str) -> list | None:
        rows = []
        try:
            with open(path, encoding="utf-8") as file:
                for line in file:
                    try:
                        rows.append(normalize(json.loads(line)))
                    except (ValueError, AttributeError):
                        metrics.USAGE_ROWS_DROPPED.inc()
                        log.error("usage: dropped an unreadable line of %s", path)
        except FileNotFoundError:
            return None
        return rows

    def _lock_owner(self) -> None:
        """Hold this writer's owner lock (created on first need, kept until stop)."""
        if self._owner_fd is not None:
            return
        os.makedirs(self._spool_dir, mode=0o700, exist_ok=True)
        for _ in range(OWNER_ATTEMPTS):
            owner = f"{os.getpid()}.{secrets.token_hex(4)}"
            path = os.path.join(self._spool_dir, f"owner-{owner}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # An adopter may have locked and unlinked the file between our open and flock
                # (it saw an owner with no lock held); a lock on an unlinked file guards nothing.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    self._owner, self._owner_fd = owner, fd
                    return
            except OSError:
                pass
            os.close(fd)
        raise OSError(f"cannot lock an owner file in {self._spool_dir}")

    def _release_owner(self) -> None:
        fd, owner = self._owner_fd, self._owner
        if fd is None:
            return
        self._owner_fd = None
        if not self._spool:
            # Nothing for anyone to adopt: leave no lock file behind.
            try:
                os.unlink(os.path.join(self._spool_dir, f"owner-{owner}.lock"))
            except OSError:
                pass
        os.close(fd)

    def _adopt(self) -> None:
        """Take over the spool files of writers that stopped or died."""
        try:
            names = os.listdir(self._spool_dir)
        except FileNotFoundError:
            return
        others: dict[str, list[str]] = {}
        for name in names:
            owner = _owner_of(name)
            if owner is not None and owner != self._owner:
                others.setdefault(owner, []).append(name)
        adopted = 0
        for owner, files in others.items():
            adopted += self._adopt_from(owner, files)
        if adopted:
            log.info("usage: took over %d usage rows that stopped workers left in %s", adopted, self._spool_dir)

    def _adopt_from(self, owner: str, files: list[str]) -> int:
        lock_path = os.path.join(self._spool_dir, f"owner-{owner}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return 0
        adopted = 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its writer runs
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:
                return 0  # another adopter is at work; its files are its own now
            for name in files:
                if name.startswith(".tmp-"):
                    # A writer died while it wrote this one (before the rename): incomplete.
                    _unlink(os.path.join(self._spool_dir, name))
                    continue
                if not name.startswith("usage-"):
                    continue
                parts = name.split("-")
                if len(parts) != 5:
                    continue
                self._lock_owner()
                parts[1] = self._owner
                mine = "-".join(parts)
                try:
                    os.rename(os.path.join(self._spool_dir, name), os.path.join(self._spool_dir, mine))
                except FileNotFoundError:
                    continue
                rows = _rows_in(mine)
                self._spool[mine] = rows
                self._count(rows)
                adopted += rows
            _unlink(lock_path)
        except OSError as exc:
            log.error("usage: cannot take over spool files of %s in %s: %s", owner, self._spool_dir, exc)
        finally:
            os.close(fd)
        return adopted


def _add_spend(conn, token: str, added: float, now: float) -> None:
    """Add ``added`` to the key's spend, starting a new budget period when its reset is due."""
    k = keys.c
    # The common case in one statement: no reset due.
    result = conn.execute(
        update(keys)
        .where(k.token == token, or_(k.budget_reset_at > now, and_(k.budget_reset_at.is_(None), k.budget_duration.is_(None))))
        .values(spend=k.spend + added)
    )
    if result.rowcount:
        return
    # A reset is due (or a period has to start): read the duration under the row lock
    # (PostgreSQL; SQLite already holds the database's write lock since our INSERT).
    row = conn.execute(select(k.budget_duration, k.budget_reset_at).where(k.token == token).with_for_update()).first()
    if row is None:
        return  # the key was deleted; its rows stay
    reset_at = row.budget_reset_at
    seconds = _duration(row.budget_duration, now)
    if reset_at is not None and reset_at > now:
        # Another writer started the new period between our two statements.
        values = {"spend": k.spend + added}
    elif reset_at is not None and seconds is not None:
        # The period ended: this spend is the first of the next one.
        values = {"spend": added, "budget_reset_at": now + seconds}
    elif seconds is not None:
        # A budget_duration without a period yet: start one.
        values = {"spend": k.spend + added, "budget_reset_at": now + seconds}
    else:
        # No (usable) budget_duration any more: spend only accumulates.
        values = {"spend": k.spend + added, "budget_reset_at": None}
    conn.execute(update(keys).where(k.token == token).values(**values))


def _duration(text: str | None, now: float) -> float | None:
    if not text:
        return None
    try:
        return float(parse_duration(text, now))
    except (TypeError, ValueError):
        log.warning("usage: ignoring the budget_duration %r of a key: not a duration", text)
        return None


def _first_line(exc: BaseException) -> str:
    # The driver's message only: SQLAlchemy's str() adds the statement and its parameters.
    message = str(getattr(exc, "orig", None) or exc)
    return (message.splitlines() or [""])[0][:300]


def _owner_of(name: str) -> str | None:
    if name.startswith("usage-") and name.endswith(".jsonl"):
        return name.split("-")[1]
    if name.startswith(".tmp-"):
        return name.split("-")[1]
    if name.startswith("owner-") and name.endswith(".lock"):
        return name[len("owner-") : -len(".lock")]
    return None


def _age(name: str) -> str:
    # usage-<owner>-<time_ns, 20 digits>-<uid>-<rows>.jsonl: the time sorts as text.
    return name.split("-")[2]


def _rows_in(name: str) -> int:
    try:
        return int(name[: -len(".jsonl")].split("-")[4])
    except (IndexError, ValueError):
        return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory is: a power cut would otherwise lose it.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
