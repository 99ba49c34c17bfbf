"""Virtual-key limits: ``rpm_limit`` (a sliding 60-second window) and ``max_parallel_requests``.

One call, :meth:`Limiter.admit`, checks both limits and, only when both pass, takes both: an
entry in the key's log of admissions (the rpm window) and a lease on a parallel slot. A
refused request therefore uses up nothing. The caller gives the lease back with
:meth:`Limiter.release` when the response body ends (or the caller leaves, or the upstream
fails); ``release`` is idempotent and never raises.

The window is exact: the log keeps every admission of the last 60 s, and a request is
admitted when fewer than ``rpm_limit`` entries are younger than 60 s. A fixed window (a
counter per clock minute) would let ``2 * rpm_limit`` through around a minute's edge.

``release`` does no store I/O: it queues the lease, and the limiter's thread gives the queued
leases back in one batch (one Redis pipeline, one database transaction) every
:data:`RELEASE_FLUSH_SECONDS`, so a slot is free again a few tens of milliseconds after the
response ended; a refusal for parallelism first gives back this worker's queued releases of
the key, and ``close`` gives back whatever is queued (see :class:`LeaseKeeper`).

Leases expire :data:`LEASE_SECONDS` after their last renewal. Each limiter renews the
leases it handed out (the database limiter: its worker's counter rows) from a daemon thread
(every ``lease_seconds / 3``), so a worker killed with SIGKILL stops renewing and its slots
come back within ``lease_seconds`` (30 s).

Backends, all with the same rules (:func:`decide` turns what a store counted into the
answer):

- :class:`RedisLimiter`: two sorted sets per key, ``proxy_app:rpm:{token}`` (admission
  times) and ``proxy_app:slots:{token}`` (lease ids scored by their expiry). One Lua script
  per admission trims both, counts both and adds to both only if both limits pass: Redis
  runs a script atomically (https://redis.io/docs/latest/develop/interactive/programmability/eval-intro/),
  so admissions from every worker of every instance are serialised without a lock. The
  script reads the time with ``TIME``: instances with skewed clocks still agree on one
  window. The braces make ``{token}`` a Redis Cluster hash tag, so both keys of a token
  live in one slot, as a multi-key script requires. Keys carry a PEXPIRE, so an idle key
  leaves nothing behind.
- :class:`DatabaseLimiter`: the rpm window is one row per admission in ``proxy_admissions``;
  the parallel slots are one counter per key and worker in ``proxy_slots``, updated in place
  (an admission adds one, a batch of releases takes them off; proxy_app/schema.py). A
  worker's lease is its row's ``expires``, moved on at each admission and renewal: a killed
  worker's row stops counting when it runs out. So an admission writes two rows (its own
  rpm row and its worker's counter) and a release writes nothing of its own: a row per lease,
  released and later deleted, wrote the table and an index of live leases three times per
  request (bench/README.md, "Later runs"). Both are read and written inside one serialised
  transaction. SQLite: ``BEGIN IMMEDIATE`` takes the database's write lock before the count
  (a plain ``BEGIN`` would count, then race another writer to the write); in the sqlite3
  driver's legacy transaction mode an explicit ``BEGIN IMMEDIATE`` opens the transaction, the
  driver adds no ``BEGIN`` of its own inside it, and ``commit()`` ends it (Python's sqlite3
  documentation, "Transaction control via the isolation_level attribute"). The limiter's
  connection is its own, detached from the engine's pool (:class:`SharedConnection`), so
  the other users of the pool are left as they are. PostgreSQL: ``pg_advisory_xact_lock``
  on a hash of the token serialises the admissions of one key only, and frees itself at
  commit or rollback; the time is the server's ``clock_timestamp()``, for the same reason
  as Redis ``TIME``. A worker admitting a key many times a second, far from its limits, takes
  several admissions in one transaction and hands them out itself (proxy_app/limit_claims.py):
  all of them are counted in the store first, so no limit is exceeded.
- :class:`LocalLimiter`: in-process counters, the fallback when Redis is unreachable
  (:class:`WithFallback`): limits then hold per worker, not overall.

Why not the ``limits`` package (https://limits.readthedocs.io)? Its moving-window strategy
is the same sorted-set log, but its API checks one rate limit per call (``hit`` consumes,
``test`` only looks): the rpm window and the parallel slots could not be checked and taken
together in one atomic step, so a request refused for its parallel limit would already have
used an rpm entry (or a ``test`` then ``hit`` pair would race other workers), and it has no
notion of a slot held until a response ends, with a lease that expires when its holder dies.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import bindparam
from sqlalchemy import case
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from proxy_app import metrics
from proxy_app import schema
from proxy_app.limit_claims import CLAIM_SECONDS
from proxy_app.limit_claims import Claims
from proxy_app.limit_claims import claim_size
from proxy_app.logs import Throttle

log = logging.getLogger("proxy_app")

WINDOW_SECONDS = 60.0  # the rpm window
LEASE_SECONDS = 30.0  # a parallel slot not renewed for this long is free again
CLEANUP_SECONDS = 10.0  # how often the database limiter deletes rows that count for nothing
WARN_EVERY_SECONDS = 60.0  # the "Redis is unreachable" WARNING, at most this often per process
REDIS_RETRY_SECONDS = 1.0  # after a Redis failure, local counters only for this long, then try again
REDIS_TIMEOUT_SECONDS = 0.5  # connect and read timeout: an outage must not stall requests
# Releases are given back in batches (see LeaseKeeper): a slot is free again within about
# this long after its response ended, for one store round trip per batch, not per request.
RELEASE_FLUSH_SECONDS = 0.05
RELEASE_RETRY_SECONDS = 1.0  # after a failed batch (store down), try again this often
# A refusal for parallelism asks the store again at most this many times, each only after this
# worker gave back released slots of the key (LeaseKeeper.ask_again).
MAX_ASK_AGAIN = 8
MAX_QUEUED_RELEASES = 100_000  # beyond this, a released lease just expires after LEASE_SECONDS

# Any Redis failure (refused, timed out, loading, READONLY, NOAUTH...) means "Redis cannot
# answer this now": never a 500 for a limit check.
REDIS_ERRORS = (redis.exceptions.RedisError, OSError)


class LimiterUnavailable(Exception):
    """The database limiter could not reach its store; the caller decides what to answer."""


@dataclass(slots=True)
class Admission:
    allowed: bool
    reason: str | None  # None, "rpm" or "parallel"
    retry_after: int  # seconds (>= 1) when refused; 0 when allowed
    rpm_limit: int | None
    rpm_remaining: int | None  # after this request: 9, 8, 7... for a limit of 10
    reset_seconds: float | None  # until the oldest admission in the window leaves it
    lease: object | None  # give to release(); None when nothing to release


class Limiter(Protocol):
    def admit(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission: ...

    def release(self, lease) -> None: ...

    def close(self) -> None: ...


def unlimited() -> Admission:
    """The answer for a key with neither limit: no store is asked, nothing to release."""
    return Admission(True, None, 0, None, None, None, None)


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header: rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def decide(
    now: float,
    rpm_limit: int | None,
    in_window: int,
    oldest: float | None,
    max_parallel: int | None,
    live: int,
    window: float = WINDOW_SECONDS,
) -> Admission:
    """The answer, from what a store counted before this request.

    ``in_window``: admissions younger than ``window``; ``oldest``: the time of the oldest of
    them (None when there is none); ``live``: leases not released nor expired. The rpm limit is
    checked first (the order keys are checked in), and a refusal consumes nothing, so the
    remaining count of a refusal for parallelism is what it was.
    """
    if rpm_limit is not None and in_window >= rpm_limit:
        reset = (oldest + window - now) if oldest is not None else window
        return Admission(False, "rpm", retry_after(reset), rpm_limit, 0, max(reset, 0.0), None)
    if rpm_limit is None:
        remaining = reset = None
    else:
        remaining = rpm_limit - in_window
        reset = (oldest if oldest is not None else now) + window - now
    if max_parallel is not None and live >= max_parallel:
        if rpm_limit is not None and oldest is None:
            reset = 0.0  # nothing in the window: nothing to wait for
        return Admission(False, "parallel", 1, rpm_limit, remaining, reset, None)
    if remaining is not None:
        remaining -= 1
    return Admission(True, None, 0, rpm_limit, remaining, reset, None)


class Lease:
    """One admitted request of a key with ``max_parallel_requests``."""

    __slots__ = ("id", "token", "owner", "released")

    def __init__(self, lease_id: str | int, token: str, owner) -> None:
        self.id = lease_id
        self.token = token
        self.owner = owner  # the limiter that took it, and gives it back
        self.released = False

    def __repr__(self) -> str:
        return f"Lease({self.id!r}, token={self.token[:12]!r}...)"


def new_lease_id() -> str:
    return os.urandom(16).hex()


class LeaseKeeper:
    """The leases a limiter handed out and has not got back: renewed, and given back in batches,
    from one daemon thread.

    The thread starts with the first lease (so a limiter made before a fork starts its own in
    the child). It runs ``renew(leases)`` every ``every`` seconds, then ``housekeeping()``, and
    ``sweep()`` (no store I/O) every ``sweep_every`` seconds and after each batch.
    A failed renewal is logged at DEBUG and tried again next time: the store's outage is
    reported by the request path, not once more here.

    Releases are deferred: :meth:`settle` only marks a lease released (it is renewed no more)
    and queues it; the thread gives the queued leases back with one ``give_back(leases)`` (one
    store round trip, one transaction) ``flush_every`` seconds after the first of them was
    queued. A request thread so pays no store round trip to release, and the store one per
    batch instead of one per request; a slot is free again within ``flush_every`` (plus the
    round trip) of its release. When the store fails, the batch stays queued (at most
    ``max_queued`` leases: one that cannot be queued expires by itself after its lease) and is
    tried again every ``retry_every`` seconds. The worker itself sees its released slots free at
    once: a refusal for parallelism while it still holds some of the key's asks again after
    giving them back (:meth:`ask_again`).
    """

    def __init__(
        self,
        name: str,
        every: float,
        renew,
        housekeeping=None,
        *,
        give_back=None,
        sweep=None,
        sweep_every: float = 0.25,
        flush_every: float = RELEASE_FLUSH_SECONDS,
        retry_every: float = RELEASE_RETRY_SECONDS,
        max_queued: int = MAX_QUEUED_RELEASES,
    ) -> None:
        self._name = name
        self._every = every
        self._renew = renew
        self._housekeeping = housekeeping
        self._give_back = give_back
        self._sweep = sweep
        self._sweep_every = sweep_every
        self._flush_every = flush_every
        self._retry_every = retry_every
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._live: dict[str, Lease] = {}
        self._queued: list[Lease] = []
        self._giving_back: list[Lease] = []  # the batch flush() is giving back right now
        self.batches = 0  # batches given back so far (see ask_again)
        # One give_back at a time (thread, flush(), close()); reentrant for no_batch_in_flight().
        self._flush_lock = threading.RLock()
        self._failure_log = Throttle(WARN_EVERY_SECONDS)
        self._dropped = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when a release is queued into an empty queue
        self._thread: threading.Thread | None = None
        self._pid = 0

    def start(self) -> None:
        if self._pid == os.getpid() or self._stop.is_set():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            if self._pid:  # inherited through fork: the thread did not come along
                self._live.clear()
                self._queued = []
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def add(self, lease: Lease) -> None:
        if self._pid != os.getpid():
            self.start()
        self._live[lease.id] = lease

    def settle(self, lease: Lease | None) -> bool:
        """Mark ``lease`` released and stop renewing it; False if there was nothing to release."""
        if lease is None or lease.released:
            return False
        lease.released = True
        self.discard(lease)
        return True

    def release(self, lease: Lease | None) -> None:
        """Settle ``lease`` and queue it for the next batch (no store I/O here)."""
        if lease is None or lease.released:
            return
        lease.released = True
        self._live.pop(lease.id, None)
        with self._lock:
            queued = self._queued
            if len(queued) >= self._max_queued:
                self._dropped += 1  # expires by itself after its lease
                return
            queued.append(lease)
            first = len(queued) == 1
        if first:
            self._wake.set()

    def discard(self, lease: Lease) -> None:
        self._live.pop(lease.id, None)

    def live(self) -> list[Lease]:
        return [lease for lease in list(self._live.values()) if not lease.released]

    def queued(self) -> int:
        return len(self._queued)

    def holds_release_of(self, token: str) -> bool:
        """Whether a release of ``token``'s is queued or being given back (a refusal for
        parallelism could be one of ours)."""
        return any(lease.token == token for lease in (*self._queued, *self._giving_back))

    def no_batch_in_flight(self):
        """A context in which no batch is being given back but this thread's own flush()."""
        return self._flush_lock

    def ask_again(self, answer: Admission, token: str, batches_before: int, admit) -> Admission:
        """After a refusal, ``admit()`` again while it was refused for parallelism and this worker
        still held released slots of the key: queued (given back now, on this thread) or in a
        batch given back since ``batches_before`` was read, before the admission. So a deferred
        release does not refuse a request that a synchronous one admits; the worker's other
        threads can take the slot first, hence a few tries (:data:`MAX_ASK_AGAIN`)."""
        for _ in range(MAX_ASK_AGAIN):
            if answer.reason != "parallel":
                break
            if not (self.batches != batches_before or self.holds_release_of(token)) or not self.flush():
                break
            batches_before = self.batches
            answer = admit()
        return answer

    def _run(self) -> None:
        next_renew = time.monotonic() + self._every
        while not self._stop.is_set():
            wake_at = next_renew if self._sweep is None else min(next_renew, time.monotonic() + self._sweep_every)
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            if self._stop.is_set():
                return  # close() gives back what is queued
            if self._sweep is not None:
                self._sweep()
            if self._wake.is_set():
                self._wake.clear()
                # Gather the releases of the next moment into the same batch.
                if self._stop.wait(self._flush_every):
                    return
                if not self.flush():
                    self._stop.wait(self._retry_every)
                    self._wake.set()  # try again
            if time.monotonic() >= next_renew:
                self.tick()
                next_renew = time.monotonic() + self._every

    def flush(self) -> bool:
        """Give back the queued leases now, in one batch; False if the store failed (they stay queued)."""
        if self._give_back is None:
            return True
        with self._flush_lock:
            with self._lock:
                # From the queue to _giving_back at once, and out of it only once counted in
                # ``batches``: a refusal that this batch caused asks again (ask_again, whose
                # flush() waits for this one on the lock).
                batch, self._queued = self._queued, []
                self._giving_back = batch
                dropped, self._dropped = self._dropped, 0
            if dropped:
                log.warning("limiter %s: %d released slots could not be queued; they expire by themselves", self._name, dropped)
            if not batch:
                return True
            try:
                self._give_back(batch)
            except Exception as exc:  # noqa: BLE001 - a daemon thread must survive any store error
                with self._lock:
                    # Back in front of what was queued meanwhile, within the bound.
                    self._queued = (batch + self._queued)[: self._max_queued]
                self._log_failure(len(batch), exc)
                return False
            else:
                self.batches += 1
            finally:
                self._giving_back = []
            self._failure_log.reset()
            return True

    def _log_failure(self, count: int, exc: BaseException) -> None:
        if not self._failure_log.due():
            return
        log.warning(
            "limiter %s: giving back %d released slots failed (%s: %s); kept, tried again (unreleased ones expire by themselves)",
            self._name,
            count,
            type(exc).__name__,
            exc,
        )

    def tick(self) -> None:
        leases = self.live()
        try:
            if leases:
                self._renew(leases)
            if self._housekeeping is not None:
                self._housekeeping()
        except Exception as exc:  # noqa: BLE001 - a daemon thread must survive any store error
            log.debug("limiter %s: lease renewal failed: %s", self._name, exc)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread, then give back the queued leases (a stopping worker frees its slots)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(timeout)
        if self._pid == os.getpid():
            self.flush()


class LocalLimiter:
    """Per-process counters, thread-safe: the same rules, held in this worker's memory.

    No expiry for leases: they live in this process, which gives them back (or dies with them).
    """

    def __init__(self, *, window: float = WINDOW_SECONDS, clock=time.time) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._log: dict[str, deque[float]] = {}
        self._live: dict[str, int] = {}
        self._swept = clock()

    def admit(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        if rpm_limit is None and max_parallel is None:
            return unlimited()
        with self._lock:
            now = self._clock()
            entries = self._log.get(token)
            if entries is None:
                entries = self._log[token] = deque()
            since = now - self._window
            while entries and entries[0] <= since:
                entries.popleft()
            live = self._live.get(token, 0)
            answer = decide(now, rpm_limit, len(entries), entries[0] if entries else None, max_parallel, live, self._window)
            if answer.allowed:
                if rpm_limit is not None:
                    entries.append(now)
                if max_parallel is not None:
                    self._live[token] = live + 1
                    answer.lease = Lease(new_lease_id(), token, self)
            if now - self._swept > self._window:
                self._sweep(since)
                self._swept = now
            return answer

    def _sweep(self, since: float) -> None:
        # Keys not seen for a window: drop their empty logs so memory follows the active keys.
        for token in [t for t, entries in self._log.items() if not entries or entries[-1] <= since]:
            if not self._live.get(token):
                del self._log[token]

    def release(self, lease) -> None:
        if lease is None or lease.released:
            return
        with self._lock:
            if lease.released:
                return
            lease.released = True
            live = self._live.get(lease.token, 0) - 1
            if live > 0:
                self._live[lease.token] = live
            else:
                self._live.pop(lease.token, None)

    def flush(self) -> bool:
        return True  # releases are immediate here

    def close(self) -> None:
        return None


# KEYS[1]: the rpm log, KEYS[2]: the slots. ARGV: rpm_limit (-1: none), max_parallel (-1:
# none), lease id, lease ms, window ms. Times are integer milliseconds from Redis TIME (an
# integer reply carries them exactly; a Lua number would be truncated). An entry is in the
# window while its time > now - window. Returns {allowed, in_window, oldest (-1: none), live,
# now}, all counted before this request.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm_limit = tonumber(ARGV[1])
local max_parallel = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[4])
local window_ms = tonumber(ARGV[5])
local in_window, oldest, live = 0, -1, 0
if rpm_limit >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window_ms)
  in_window = redis.call('ZCARD', KEYS[1])
  if in_window > 0 then
    oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
  end
end
if max_parallel >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  live = redis.call('ZCARD', KEYS[2])
end
local allowed = 0
if (rpm_limit < 0 or in_window < rpm_limit) and (max_parallel < 0 or live < max_parallel) then
  allowed = 1
  if rpm_limit >= 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], window_ms + 1000)
  end
  if max_parallel >= 0 then
    redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[3])
    redis.call('PEXPIRE', KEYS[2], lease_ms + 1000)
  end
end
return {allowed, in_window, oldest, live, now}
"""

# KEYS[1]: the slots of one key. ARGV: lease ms, then the lease ids to renew. XX: a lease that
# already expired (or was released) is not brought back.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease_ms + 1000)
return 0
"""


def rpm_key(token: str) -> str:
    return f"proxy_app:rpm:{{{token}}}"


def slots_key(token: str) -> str:
    return f"proxy_app:slots:{{{token}}}"


def redis_client(url: str, timeout: float = REDIS_TIMEOUT_SECONDS, environ=os.environ) -> redis.Redis:
    """A client that fails fast: short timeouts, no retries.

    No retry, because an admission whose answer was lost may have been taken: sending it again
    could take two. redis-py retries 3 times by default since 6.0.

    The pool holds a connection per request thread (``PROXY_THREADS``, as in
    proxy_app/gunicorn_conf.py) plus the limiter's own thread: redis-py's ConnectionPool
    raises instead of waiting when it has none left, and makes a connection only when needed.
    """
    try:
        threads = int(environ.get("PROXY_THREADS") or 32)
    except ValueError:
        threads = 32
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 0),
        max_connections=max(100, threads + 8),
    )


def describe_redis(client: redis.Redis) -> str:
    """host:port/db of a client, for logs (never the password)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisLimiter:
    """Limits shared by every worker of every instance using one Redis. Raises redis errors."""

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        *,
        lease_seconds: float = LEASE_SECONDS,
        window: float = WINDOW_SECONDS,
        renew_every: float | None = None,
    ) -> None:
        if isinstance(url_or_client, str):
            self._redis = redis_client(url_or_client)
            self._own_client = True
        else:
            self._redis = url_or_client
            self._own_client = False
        self.lease_seconds = lease_seconds
        self.window = window
        self._lease_ms = str(int(lease_seconds * 1000))
        self._window_ms = str(int(window * 1000))
        self._admit = self._redis.register_script(ADMIT_LUA)
        self._renew = self._redis.register_script(RENEW_LUA)
        self._local = threading.local()
        self._connections: weakref.WeakSet = weakref.WeakSet()  # every thread's, for close()
        self._connections_pid = os.getpid()
        self._connections_lock = threading.Lock()
        self._keeper = LeaseKeeper(
            "limiter-redis", renew_every or lease_seconds / 3, self._renew_leases, give_back=self._give_back
        )

    def describe(self) -> str:
        return f"Redis at {describe_redis(self._redis)}"

    def admit(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        if rpm_limit is None and max_parallel is None:
            return unlimited()
        batches = self._keeper.batches
        answer = self._admit_once(token, rpm_limit, max_parallel)
        if not answer.allowed:
            answer = self._keeper.ask_again(answer, token, batches, lambda: self._admit_once(token, rpm_limit, max_parallel))
        return answer

    def _admit_once(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        lease_id = new_lease_id()
        # One EVALSHA, sent as it is (Script.__call__ builds lists and checks the client's type
        # on every call). A NOSCRIPT reply (a restarted or flushed Redis) means the script did
        # not run: loading it and sending again cannot admit twice.
        command = (
            "EVALSHA",
            self._admit.sha,
            2,
            f"proxy_app:rpm:{{{token}}}",
            f"proxy_app:slots:{{{token}}}",
            -1 if rpm_limit is None else rpm_limit,
            -1 if max_parallel is None else max_parallel,
            lease_id,
            self._lease_ms,
            self._window_ms,
        )
        try:
            allowed, in_window, oldest, live, now = self._call(command)
        except redis.exceptions.NoScriptError:
            self._redis.script_load(ADMIT_LUA)
            allowed, in_window, oldest, live, now = self._call(command)
        answer = decide(now / 1000, rpm_limit, in_window, oldest / 1000 if oldest >= 0 else None, max_parallel, live, self.window)
        if allowed and max_parallel is not None:
            lease = answer.lease = Lease(lease_id, token, self)
            self._keeper.add(lease)
        return answer

    def _call(self, command: tuple):
        """Send ``command`` on this thread's own connection and read its reply.

        The admission is the one Redis command of a request: sent on a connection the thread
        keeps, not through ``Redis.execute_command``, whose pool checkout and checkin and
        per-command instrumentation cost more than the round trip to a local Redis. No retry
        either way (see :func:`redis_client`). Any failure but an error reply drops the
        connection, so no half-read reply is left on it; the next call connects again.
        """
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.pid != os.getpid():
            connection = self._new_connection()
        try:
            # As the pool does at checkout: a connection the server closed (a restart, its
            # idle timeout) reads as EOF here and is opened again before the command is sent,
            # instead of failing an admission. can_read() connects a connection not yet open.
            try:
                stale = connection.can_read()
            except REDIS_ERRORS:
                stale = True
            if stale:
                connection.disconnect()
            connection.send_command(*command)
            return connection.read_response()
        except redis.exceptions.ResponseError:
            raise  # a whole error reply: the connection is fine
        except BaseException:
            connection.disconnect()
            raise

    def _new_connection(self):
        pool = self._redis.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        with self._connections_lock:
            if self._connections_pid != os.getpid():  # inherited through fork: not ours to close
                self._connections = weakref.WeakSet()
                self._connections_pid = os.getpid()
            self._connections.add(connection)
        self._local.connection = connection
        return connection

    def release(self, lease) -> None:
        """Queue ``lease`` for the next batch (see :class:`LeaseKeeper`): no Redis command here."""
        self._keeper.release(lease)

    def flush(self) -> bool:
        """Give back the queued releases now (tests, shutdown); False if Redis failed."""
        return self._keeper.flush()

    def _give_back(self, leases: list[Lease]) -> None:
        by_token: dict[str, list[str]] = {}
        for lease in leases:
            by_token.setdefault(lease.token, []).append(lease.id)
        pipe = self._redis.pipeline(transaction=False)
        for token, ids in by_token.items():
            pipe.zrem(slots_key(token), *ids)
        try:
            pipe.execute()
        except REDIS_ERRORS:
            metrics.STORE_ERRORS.labels("redis", "limit").inc()
            raise

    def _renew_leases(self, leases: list[Lease]) -> None:
        by_token: dict[str, list[str]] = {}
        for lease in leases:
            by_token.setdefault(lease.token, []).append(lease.id)
        pipe = self._redis.pipeline(transaction=False)
        for token, ids in by_token.items():
            self._renew(keys=(slots_key(token),), args=(self._lease_ms, *ids), client=pipe)
        pipe.execute()

    def renew_now(self) -> None:
        """Renew the live leases at once (tests; the thread does it every ``renew_every``)."""
        self._keeper.tick()

    def close(self) -> None:
        """Stop the thread and give back the queued releases (no other lease is released)."""
        self._keeper.close()
        with self._connections_lock:
            connections = list(self._connections) if self._connections_pid == os.getpid() else []
            self._connections = weakref.WeakSet()
        for connection in connections:
            connection.disconnect()
        if self._own_client:
            self._redis.close()


class WithFallback:
    """The shared store (Redis, or the database) while it answers; this worker's own
    counters while it does not.

    After a failure, the store is left alone for ``retry_every`` seconds (a dead host costs a
    connect timeout per attempt), then the next admission tries it again. A lease is given
    back to the limiter that took it, so one taken locally is released locally.

    :param errors: what the shared limiter raises when its store fails.
    :param store: the store's name in ``proxy_store_errors_total`` (None: the shared
        limiter counts its own errors).
    """

    def __init__(
        self,
        redis_limiter,
        local: LocalLimiter | None = None,
        *,
        retry_every: float = REDIS_RETRY_SECONDS,
        warn_every: float = WARN_EVERY_SECONDS,
        errors: tuple = REDIS_ERRORS,
        store: str | None = "redis",
    ) -> None:
        self.errors = errors
        self.store = store
        self.redis = redis_limiter
        self.local = local if local is not None else LocalLimiter(window=redis_limiter.window)
        self._retry_every = retry_every
        self._skip_until = 0.0  # monotonic; 0 while Redis is healthy
        self._outage_log = Throttle(warn_every)
        self._lock = threading.Lock()

    @property
    def degraded(self) -> bool:
        return self._skip_until != 0.0

    def admit(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        if rpm_limit is None and max_parallel is None:
            return unlimited()
        skip_until = self._skip_until
        if not skip_until or time.monotonic() >= skip_until:
            try:
                answer = self.redis.admit(token, rpm_limit, max_parallel)
            except self.errors as exc:
                self._failed(exc)
            else:
                if skip_until:
                    self._recovered()
                return answer
        metrics.LIMITER_FALLBACK.inc()
        return self.local.admit(token, rpm_limit, max_parallel)

    def _failed(self, exc: BaseException) -> None:
        if self.store is not None:
            metrics.STORE_ERRORS.labels(self.store, "limit").inc()
        with self._lock:
            self._skip_until = time.monotonic() + self._retry_every
        if not self._outage_log.due():
            return
        log.warning(
            "%s is unreachable (%s: %s); rate limits fall back to this worker's own counters until it answers",
            self.redis.describe(),
            type(exc).__name__,
            exc,
        )

    def _recovered(self) -> None:
        with self._lock:
            if not self._skip_until:
                return
            self._skip_until = 0.0
        log.info("%s answers again; rate limits are shared again", self.redis.describe())

    def release(self, lease) -> None:
        if lease is None:
            return
        owner = getattr(lease, "owner", None)
        if owner is not None:
            owner.release(lease)

    def flush(self) -> bool:
        """Give back the shared limiter's queued releases now; False if its store failed."""
        return self.redis.flush()

    def close(self) -> None:
        self.redis.close()
        self.local.close()


_ADMISSIONS = schema.admissions
_SLOTS = schema.slots
_TOKEN = bindparam("token")
_SINCE = bindparam("since")
_NOW = bindparam("now")
_OF_KEY = _ADMISSIONS.c.token == _TOKEN


def _edge(*where, newest: bool):
    order = _ADMISSIONS.c.id.desc() if newest else _ADMISSIONS.c.id
    return lambda column: select(column).where(*where).order_by(order).limit(1).scalar_subquery()


# Counting a key's rows in the window would cost a step per row (~0.1 us each in SQLite: 20 ms
# for a key admitted 3000 times a second). Instead each row's id starts with the key's
# admission number (see :func:`row_id`), so the count is the newest number minus the number of
# the oldest row still in the window, plus one. Rows leave only from the old end of the window
# (cleanup), never from its middle, so the numbers in the window are consecutive. The primary
# key (token, id) keeps a key's rows in number order, which is also time order (times per key
# strictly increase), so both edges are read from it: the newest is its last row; the oldest
# in the window is the first row from ``:from_id`` on younger than ``:since``, where
# ``:from_id`` is an id known to be no younger than it (this process's previous answer for the
# key: the oldest in the window only moves forward), so the walk passes over the rows that
# left the window since, not over all the rows cleanup has not deleted yet.
_FROM_ID = bindparam("from_id")
_newest = _edge(_OF_KEY, newest=True)
_oldest = _edge(_OF_KEY, _ADMISSIONS.c.id >= _FROM_ID, _ADMISSIONS.c.admitted_at > _SINCE, newest=False)
# The key's slots in flight: the sum of its holders' counters that have not run out.
_LIVE = select(func.coalesce(func.sum(_SLOTS.c.live), 0)).where(_SLOTS.c.token == _TOKEN, _SLOTS.c.expires > _NOW).scalar_subquery()
_STATE_COLUMNS = (
    _newest(_ADMISSIONS.c.id),
    _newest(_ADMISSIONS.c.admitted_at),
    _oldest(_ADMISSIONS.c.id),
    _oldest(_ADMISSIONS.c.admitted_at),
)
_STATE = select(*_STATE_COLUMNS)
_STATE_AND_LIVE = select(*_STATE_COLUMNS, _LIVE)
SEQ_DIGITS = 16  # hex digits of the admission number at the start of a row id (36 characters in all)


def first_seq(now: float) -> int:
    """The admission number of a key's first row (none left): microseconds since the epoch, so a
    key's numbers keep increasing even after all its rows were cleaned up (an admission takes
    far longer than a microsecond), and an earlier answer's id stays a lower bound."""
    return int(now * 1e6)


def row_id(seq: int) -> str:
    """An admission row's id: the key's admission number, then 80 random bits (unique lease id)."""
    return f"{seq:0{SEQ_DIGITS}x}{os.urandom(10).hex()}"


def row_seq(row_id_: str) -> int:
    return int(row_id_[:SEQ_DIGITS], 16)


_INSERT = _ADMISSIONS.insert()


def claimed_admission(rpm_limit: int | None, claimed: tuple[int | None, float | None]) -> Admission:
    """An admission handed out of this worker's claim (``Claims.take``'s answer)."""
    remaining, reset_seconds = claimed
    return Admission(True, None, 0, rpm_limit, remaining, reset_seconds, None)


def _take_slot(insert):
    """``:n`` more slots on this holder's row of the key, made if missing; its expiry moves on."""
    statement = insert(_SLOTS).values(token=_TOKEN, holder=bindparam("holder"), live=bindparam("n"), expires=bindparam("expires"))
    return statement.on_conflict_do_update(
        index_elements=[_SLOTS.c.token, _SLOTS.c.holder],
        set_={"live": _SLOTS.c.live + statement.excluded.live, "expires": statement.excluded.expires},
    )


_TAKE_SLOT = {"sqlite": _take_slot(sqlite_insert), "postgresql": _take_slot(postgresql_insert)}
# UPDATE takes no bind parameter named after a column: the row is :key_token, :key_holder there.
_OF_HOLDER = (_SLOTS.c.token == bindparam("key_token"), _SLOTS.c.holder == bindparam("key_holder"))
# Never below 0: a holder whose row was cleaned up while it stalled gives back slots it no
# longer counts.
_GIVE_BACK = _SLOTS.update().where(*_OF_HOLDER).values(live=case((_SLOTS.c.live > bindparam("n"), _SLOTS.c.live - bindparam("n")), else_=0))
# A row that ran out while its worker stalled (longer than a lease) counts again once renewed:
# that worker is alive, and its requests are still in flight.
_RENEW = _SLOTS.update().where(*_OF_HOLDER).values(expires=bindparam("expires"))
# Rows that count for nothing any more: admissions out of the window (and, from an instance
# still on revision 0002, not holding a live slot); holders whose row ran out a lease ago.
_CLEANUP = _ADMISSIONS.delete().where(_ADMISSIONS.c.admitted_at <= _SINCE, _ADMISSIONS.c.lease_expires <= _NOW)
_CLEANUP_SLOTS = _SLOTS.delete().where(_SLOTS.c.expires <= bindparam("stale"))
# PostgreSQL: serialise the admissions of one key, then read the server's clock. The
# two-integer form has a key space of its own (it cannot meet a single-bigint lock such as
# the migrations' one); the lock is released at commit or rollback.
_PG_LOCK_NAMESPACE = 0x6C696D  # "lim"
_PG_LOCK_AND_NOW = text(
    "SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision) "
    f"FROM (SELECT pg_advisory_xact_lock({_PG_LOCK_NAMESPACE}, hashtext(:token))) AS locked"
)
_PG_NOW = text("SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision)")

MAX_KNOWN_KEYS = 100_000  # DatabaseLimiter._from: beyond this many keys, start over

# SQLite's hot path runs the Core statements above through the sqlite3 driver directly,
# compiled once in the driver's named style: one dict per call binds the repeated parameters.
_NAMED_SQLITE = sqlite_dialect(paramstyle="named")


def count_by_token(leases) -> dict[str, int]:
    """How many of ``leases`` each key holds."""
    counts: dict[str, int] = {}
    for lease in leases:
        counts[lease.token] = counts.get(lease.token, 0) + 1
    return counts


def holder_id() -> str:
    """This process's name on its slot rows: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(6).hex()}"


def sqlite_sql(statement) -> tuple[str, dict]:
    """``statement``'s SQL text for the sqlite3 driver, and its parameters (constants filled in)."""
    compiled = statement.compile(dialect=_NAMED_SQLITE)
    return str(compiled), dict(compiled.params)


# Connections a forked child inherited from its parent: never closed nor used in the child
# (SQLite: "do not open a database connection, then fork()", https://www.sqlite.org/howtocorrupt.html),
# kept referenced so that garbage collection does not close them either.
_INHERITED: list = []


class _Held:
    """A thread's connection and cursor (sqlite3 objects take no weak reference; this does)."""

    __slots__ = ("connection", "cursor", "pid", "__weakref__")

    def __init__(self, connection, pid: int) -> None:
        self.connection = connection
        self.cursor = connection.cursor()
        self.pid = pid


class ThreadConnections:
    """One sqlite3 connection per thread, kept for the thread's life (not checked out of the
    pool, and back in, for every admission: that costs more than the admission's statements).

    Each is taken from the engine's pool, so the engine's ``connect`` listener (WAL,
    busy_timeout) sets it up, and detached from it at once (SQLAlchemy's
    ``PoolProxiedConnection.detach``): the pool forgets it and opens another for its next user,
    so the other users of the pool are never short of connections. A connection is closed when
    its thread ends (garbage), or by :meth:`close`.
    """

    def __init__(self, engine) -> None:
        self._engine = engine
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._all: weakref.WeakSet = weakref.WeakSet()

    def get(self) -> _Held:
        """This thread's connection and cursor."""
        held = getattr(self._local, "held", None)
        if held is not None and held.pid == self._pid:
            return held
        return self._open(self._local)

    def _open(self, local):
        with self._lock:
            pid = os.getpid()
            if self._pid != pid:  # inherited through fork
                _INHERITED.extend(self._all)
                self._all = weakref.WeakSet()
                self._pid = pid
            inherited = getattr(local, "held", None)
            if inherited is not None and inherited.pid != pid:
                _INHERITED.append(inherited)
            fairy = self._engine.raw_connection()
            fairy.detach()
            held = local.held = _Held(fairy.dbapi_connection, pid)
            self._all.add(held)
        return held

    def close(self) -> None:
        with self._lock:
            if self._pid != os.getpid():
                return
            connections, self._all = list(self._all), weakref.WeakSet()
        for held in connections:
            try:
                held.connection.close()
            except Exception:  # noqa: BLE001 - closing at shutdown: nothing to do about it
                pass


class SharedConnection(ThreadConnections):
    """One sqlite3 connection for the whole process, set up and detached like
    :class:`ThreadConnections`' ones; its users serialise themselves (the limiter holds its
    admission lock around every use: SQLite lets one writer in at a time anyway). One page
    cache, kept warm by every admission, instead of one per request thread. SQLAlchemy opens
    file databases with ``check_same_thread=False``, so any thread may use it."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self._local = _Slot()  # one slot for every thread

    def get(self) -> _Held:
        held = self._local.held
        if held is not None and held.pid == self._pid:
            return held
        return self._open(self._local)


class _Slot:
    held: _Held | None = None


class DatabaseLimiter:
    """Limits in the database, for deployments without Redis. Raises :class:`LimiterUnavailable`.

    Each process is one holder of slot rows (:func:`holder_id`, made again after a fork):
    its leases are counted on its own rows, and given back from them.
    """

    def __init__(
        self,
        engine,
        *,
        lease_seconds: float = LEASE_SECONDS,
        window: float = WINDOW_SECONDS,
        renew_every: float | None = None,
        cleanup_every: float = CLEANUP_SECONDS,
        claim_seconds: float = CLAIM_SECONDS,
    ) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._errors = (SQLAlchemyError, engine.dialect.loaded_dbapi.Error)
        if self._sqlite:
            self._connections = SharedConnection(engine)
            self._admit_lock = threading.RLock()  # reentrant for _admit_after_flush
            self._sql_state, self._state_params = sqlite_sql(_STATE)
            self._sql_state_live, self._state_live_params = sqlite_sql(_STATE_AND_LIVE)
            self._sql_insert = sqlite_sql(_INSERT.values({c: bindparam(c.name) for c in _ADMISSIONS.c}))[0]
            self._sql_take, self._take_params = sqlite_sql(_TAKE_SLOT["sqlite"])
            self._sql_give_back, self._give_back_params = sqlite_sql(_GIVE_BACK)
        self.lease_seconds = lease_seconds
        self.window = window
        self._cleanup_every = cleanup_every
        self._cleaned = 0.0
        # token -> (id, since): this process's last oldest row in the key's window, and the
        # window's start then (see _STATE): where the next look for the oldest starts.
        self._from: dict[str, tuple[str, float]] = {}
        self._holder = ""  # this process's slot rows (holder_id), made at its first slot
        self._holder_pid = 0
        self._lease_ids = itertools.count()
        self._claims = Claims(claim_seconds)
        self._claim_seconds = claim_seconds
        self._keeper = LeaseKeeper(
            "limiter-database",
            renew_every or lease_seconds / 3,
            self._renew_leases,
            self._cleanup,
            give_back=self._give_back,
            sweep=self._drop_claims,
            sweep_every=claim_seconds,
        )

    def describe(self) -> str:
        return f"the database ({self._engine.dialect.name}) holding the limit counters"

    def admit(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        if rpm_limit is None and max_parallel is None:
            return unlimited()
        self._keeper.start()  # housekeeping runs for rpm-only keys too
        claimed = self._claims.take(token, (rpm_limit, max_parallel))
        if claimed is not None:  # counted in the store by an earlier transaction (limit_claims)
            answer = claimed_admission(rpm_limit, claimed)
        else:
            batches = self._keeper.batches
            answer = self._admit_once(token, rpm_limit, max_parallel)
            if not answer.allowed:
                self._drop_claims()  # expired claims' unused slots, so they go back with the flush
                again = self._admit_after_flush if self._sqlite else self._admit_once
                answer = self._keeper.ask_again(answer, token, batches, lambda: again(token, rpm_limit, max_parallel))
        if answer.allowed and max_parallel is not None:
            lease = answer.lease = Lease(next(self._lease_ids), token, self)
            self._keeper.add(lease)
        return answer

    def _admit_once(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        demand = self._claims.demand(token)
        try:
            if self._sqlite:
                answer, size = self._admit_sqlite(token, rpm_limit, max_parallel, demand)
            else:
                with self._engine.begin() as conn:
                    now = conn.execute(_PG_LOCK_AND_NOW, {"token": token}).scalar_one()
                    params = {"token": token, "since": now - self.window, "now": now}
                    statement = _STATE if max_parallel is None else _STATE_AND_LIVE
                    row = self._state(lambda from_id: conn.execute(statement, {**params, "from_id": from_id}).fetchone(), token, now)
                    answer, rows, expires, size = self._decide(row, token, now, rpm_limit, max_parallel, demand)
                    if answer.allowed:
                        if rows:
                            conn.execute(_INSERT, rows)
                        if max_parallel is not None:
                            conn.execute(_TAKE_SLOT["postgresql"], {"token": token, "holder": self.holder(), "n": size, "expires": expires})
        except self._errors as exc:
            metrics.STORE_ERRORS.labels("database", "limit").inc()
            raise LimiterUnavailable(f"the limit store (database) failed: {type(getattr(exc, 'orig', None) or exc).__name__}") from exc
        if size > 1:
            dropped = self._claims.keep(token, (rpm_limit, max_parallel), size, answer.rpm_remaining, answer.reset_seconds)
            if dropped and max_parallel is not None:
                self._give_back_unused(token, dropped)
        return answer

    def _admit_after_flush(self, token: str, rpm_limit: int | None, max_parallel: int | None) -> Admission:
        """SQLite, after a refusal for parallelism: this worker's queued releases given back and
        the admission asked again with no batch in flight and no other admission of this worker
        in between (both locks held, in the keeper's order: flush, then admit). Every slot the
        store still counts for this worker is then held by a request (or by a live claim), as
        with synchronous releases, so one try is enough."""
        with self._keeper.no_batch_in_flight(), self._admit_lock:
            self._keeper.flush()
            return self._admit_once(token, rpm_limit, max_parallel)

    def _drop_claims(self, everything: bool = False) -> None:
        """Drop the claims that ran out (all of them with ``everything``); their unused slots go
        back with the next batch of releases."""
        for token, count in self._claims.expired(everything):
            self._give_back_unused(token, count)

    def _give_back_unused(self, token: str, count: int) -> None:
        for _ in range(count):  # counted on this worker's row: given back like released leases
            self._keeper.release(Lease(next(self._lease_ids), token, self))

    def holder(self) -> str:
        """This process's name on its slot rows (a new one after a fork)."""
        if self._holder_pid != os.getpid():
            self._holder, self._holder_pid = holder_id(), os.getpid()
        return self._holder

    def _admit_sqlite(self, token: str, rpm_limit, max_parallel, demand: int) -> tuple[Admission, int]:
        # The hot path on the default store: this thread's own sqlite3 connection, statements
        # compiled once. In the driver's legacy transaction mode an explicit BEGIN IMMEDIATE
        # opens the transaction (the driver adds no BEGIN of its own inside one) and commit()
        # ends it.
        held = self._connections.get()
        connection, cursor = held.connection, held.cursor
        if max_parallel is None:
            sql, params = self._sql_state, self._state_params.copy()
        else:
            sql, params = self._sql_state_live, self._state_live_params.copy()
        # One admission at a time per process: SQLite lets one writer in at a time anyway, and a
        # thread that finds the file locked backs off in SQLite's busy handler (sleeps of 1 ms
        # and up, then retries); waiting on a lock here costs the other threads nothing.
        with self._admit_lock:
            if demand > 1:  # another thread's claim may have come while this one waited
                claimed = self._claims.take(token, (rpm_limit, max_parallel), count=False)
                if claimed is not None:
                    return claimed_admission(rpm_limit, claimed), 1
            return self._admit_sqlite_locked(connection, cursor, sql, params, token, rpm_limit, max_parallel, demand)

    def _admit_sqlite_locked(self, connection, cursor, sql, params, token, rpm_limit, max_parallel, demand) -> tuple[Admission, int]:
        cursor.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()  # read once the write lock is held: times per key keep increasing
            params["token"] = token
            params["since"] = now - self.window
            params["now"] = now

            def state(from_id):
                params["from_id"] = from_id
                cursor.execute(sql, params)
                return cursor.fetchone()

            answer, rows, expires, size = self._decide(self._state(state, token, now), token, now, rpm_limit, max_parallel, demand)
            if answer.allowed:
                if len(rows) == 1:
                    cursor.execute(self._sql_insert, rows[0])
                elif rows:
                    cursor.executemany(self._sql_insert, rows)
                if max_parallel is not None:
                    take = {**self._take_params, "token": token, "holder": self.holder(), "n": size, "expires": expires}
                    cursor.execute(self._sql_take, take)
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        return answer, size

    def _state(self, query, token: str, now: float):
        """The key's state row, ``query(from_id)``, starting the look for the oldest row in the
        window at this process's previous one; remembers the new one."""
        since = now - self.window
        known = self._from.get(token)
        from_id = known[0] if known is not None and known[1] <= since else ""  # a clock stepped back: from the start
        row = query(from_id)
        newest_id, oldest_id = row[0], row[2]
        if from_id and (newest_id is None or newest_id < from_id):  # numbers started again (a clock stepped back)
            from_id = ""
            row = query(from_id)
            newest_id, oldest_id = row[0], row[2]
        edge = oldest_id if oldest_id is not None else newest_id  # none in the window: all are older
        if edge is not None:
            if len(self._from) >= MAX_KNOWN_KEYS and token not in self._from:
                self._from.clear()
            self._from[token] = (edge, since)
        return row

    def _decide(self, row, token: str, now: float, rpm_limit, max_parallel, demand: int) -> tuple[Admission, list[dict], float, int]:
        """The answer from the key's state row, the rpm rows to insert, the holder row's new
        expiry, and how many admissions to take (``claim_size``; 1 unless allowed)."""
        newest_id, newest_at, oldest_id, oldest_at = row[:4]
        live = row[4] if max_parallel is not None else 0
        in_window = row_seq(newest_id) - row_seq(oldest_id) + 1 if oldest_id is not None else 0
        answer = decide(now, rpm_limit, in_window, oldest_at, max_parallel, live, self.window)
        size = claim_size(demand, rpm_limit, in_window, max_parallel, live) if answer.allowed else 1
        expires = now + self.lease_seconds if max_parallel is not None else 0.0
        if rpm_limit is None or not answer.allowed:
            return answer, [], expires, size
        first = row_seq(newest_id) + 1 if newest_id is not None else first_seq(now)
        # A claim's rows count from the last moment one of them can be handed out (limit_claims).
        at = now + self._claim_seconds if size > 1 else now
        # Strictly increasing times per key, so ordering by time orders by number too
        # (a clock stepped back, or two admissions within its resolution).
        if newest_at is not None and at <= newest_at:
            at = newest_at + 1e-6
        rows = [{"id": row_id(first + i), "token": token, "admitted_at": at + i * 1e-6, "lease_expires": 0.0} for i in range(size)]
        return answer, rows, expires, size

    def release(self, lease) -> None:
        """Queue ``lease`` for the next batch (see :class:`LeaseKeeper`): no database I/O here."""
        self._keeper.release(lease)

    def flush(self) -> bool:
        """Give back the queued releases now (tests, shutdown); False if the database failed."""
        return self._keeper.flush()

    def _give_back(self, leases: list[Lease]) -> None:
        # One transaction for the whole batch: one UPDATE per key.
        rows = [{"key_token": token, "key_holder": self.holder(), "n": n} for token, n in count_by_token(leases).items()]
        try:
            if self._sqlite:
                with self._admit_lock:  # the admissions' connection
                    held = self._connections.get()
                    connection, cursor = held.connection, held.cursor
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        cursor.executemany(self._sql_give_back, [{**self._give_back_params, **row} for row in rows])
                        connection.commit()
                    except BaseException:
                        connection.rollback()
                        raise
            else:
                with self._engine.begin() as conn:
                    conn.execute(_GIVE_BACK, rows)
        except self._errors:
            metrics.STORE_ERRORS.labels("database", "limit").inc()
            raise

    def _now(self, conn) -> float:
        return conn.execute(_PG_NOW).scalar_one() if not self._sqlite else time.time()

    def _renew_leases(self, leases: list[Lease]) -> None:
        with self._engine.begin() as conn:
            expires = self._now(conn) + self.lease_seconds
            holder = self.holder()
            tokens = {lease.token for lease in leases}
            conn.execute(_RENEW, [{"key_token": token, "key_holder": holder, "expires": expires} for token in tokens])

    def _cleanup(self) -> None:
        if time.monotonic() - self._cleaned < self._cleanup_every:
            return
        self._cleaned = time.monotonic()
        with self._engine.begin() as conn:
            now = self._now(conn)
            conn.execute(_CLEANUP, {"since": now - self.window, "now": now})
            conn.execute(_CLEANUP_SLOTS, {"stale": now - self.lease_seconds})

    def renew_now(self) -> None:
        """Renew the live leases (and clean up) at once; the thread does it every ``renew_every``."""
        self._cleaned = 0.0
        self._keeper.tick()

    def close(self) -> None:
        """Stop the thread, give back the queued releases (no other lease is released), close
        this limiter's own connections."""
        self._drop_claims(everything=True)
        self._keeper.close()
        if self._sqlite:
            self._connections.close()


def make_limiter(engine, redis_url: str | None) -> Limiter:
    """Redis (with per-worker fallback) when a Redis URL is set, else the database.

    Call it in each worker, after the fork: the renewal thread and connections are per process.
    """
    if redis_url:
        return WithFallback(RedisLimiter(redis_url))
    return WithFallback(DatabaseLimiter(engine), errors=(LimiterUnavailable,), store=None)
