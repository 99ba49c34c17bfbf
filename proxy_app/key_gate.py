"""Virtual keys on the request path: look the key up (cached), check it, take its limits.

:class:`KeyCache` keeps each worker's view of the keys it has seen, so a hot key costs no
store read per request:
- an entry is re-read from the database once it is REFRESH_SECONDS old (its spend moves as
  usage rows are written), and as soon as the change watcher sees a key change
  (proxy_app/notices.py): a revoked key stops working within a poll. Entries are marked
  stale rather than dropped, so that an outage starting right after an unrelated change
  still finds the keys this worker verified;
- an unknown key is remembered as unknown for a moment only, so a new key works at once
  and a caller cycling random keys cannot grow the cache without bound;
- while the database is unreachable, a key verified in the last ``key_cache_ttl`` seconds
  keeps working (for as long as the outage lasts with ``allow_requests_on_db_unavailable``);
  any other virtual key is answered 503.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from proxy_app import metrics
from proxy_app.errors import Refusal
from proxy_app.key_rules import UNKNOWN_KEY
from proxy_app.key_rules import key_refusal
from proxy_app.key_rules import limit_refusal
from proxy_app.key_rules import rate_limit_headers
from proxy_app.key_store import find_key
from proxy_app.keys import token_of

log = logging.getLogger("proxy_app")
REFRESH_SECONDS = 5.0
UNKNOWN_SECONDS = 1.0
MAX_ENTRIES = 10_000
STORE_DOWN = "The key store is unavailable; try again shortly."


class StoreUnavailable(Exception):
    """The database could not be asked about a key this worker cannot vouch for."""


@dataclass(slots=True)
class _Entry:
    record: object | None  # KeyRecord, or None: no such key
    checked: float  # when the database last answered for it
    epoch: int  # KeyCache.epoch then: an entry of an older epoch must be re-read


class KeyCache:
    def __init__(self, engine, ttl: float, allow_on_outage: bool):
        self.engine = engine
        self.ttl = ttl
        self.allow_on_outage = allow_on_outage
        self._entries: dict[str, _Entry] = {}
        self.epoch = 0

    def clear(self) -> None:
        """Keys changed: every entry must be re-read before it is trusted again."""
        self.epoch += 1

    def get(self, token: str, now: float):
        """The key record for ``token``, or None if there is none.

        :raises StoreUnavailable: the database is unreachable and this worker has not
            verified the key recently enough to vouch for it.
        """
        entry = self._entries.get(token)
        if (
            entry is not None
            and entry.epoch == self.epoch
            and now - entry.checked < (REFRESH_SECONDS if entry.record is not None else UNKNOWN_SECONDS)
        ):
            return entry.record
        epoch = self.epoch
        try:
            with self.engine.connect() as conn:
                record = find_key(conn, token, now)
        except SQLAlchemyError as exc:
            metrics.STORE_ERRORS.labels("database", "key_lookup").inc()
            if entry is not None and entry.record is not None and (self.allow_on_outage or now - entry.checked < self.ttl):
                return entry.record
            raise StoreUnavailable(type(getattr(exc, "orig", None) or exc).__name__) from None
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {t: e for t, e in self._entries.items() if e.record is not None}
            if len(self._entries) >= MAX_ENTRIES:
                self._entries = {}
        self._entries[token] = _Entry(record, now, epoch)
        return record


@dataclass(slots=True)
class Pass:
    """A virtual key that passed: who it is, the slot it holds, headers for the answer."""

    token: str
    key_alias: str | None
    lease: object | None
    headers: list[tuple[str, str]]


class KeyGate:
    """Checks a presented virtual key in the documented order; see proxy_app/key_rules.py."""

    def __init__(self, cache: KeyCache, limiter):
        self.cache = cache
        self.limiter = limiter

    def admit(self, presented: str, path: str) -> Pass:
        """:raises Refusal: 401, 403, 400 budget_exceeded, 429 or 503."""
        token = token_of(presented)
        now = time.time()
        try:
            record = self.cache.get(token, now)
        except StoreUnavailable:
            refuse("store_unavailable")
            raise Refusal(503, STORE_DOWN, "service_unavailable", [("Retry-After", "5")]) from None
        if record is None:
            refuse("unknown_key")
            raise Refusal(401, UNKNOWN_KEY, "auth_error")
        refusal = key_refusal(record, token, path, now)
        if refusal is not None:
            refuse({401: "invalid_key", 403: "route_not_allowed"}.get(refusal.status, "budget_exceeded"))
            raise of_key(refusal, record)
        if record.rpm_limit is None and record.max_parallel_requests is None:
            return Pass(record.token, record.key_alias, None, [])
        admission = self.limiter.admit(record.token, record.rpm_limit, record.max_parallel_requests)
        if not admission.allowed:
            refuse(admission.reason)
            raise of_key(limit_refusal(admission, record), record)
        return Pass(record.token, record.key_alias, admission.lease, rate_limit_headers(admission))

    def release(self, lease) -> None:
        self.limiter.release(lease)


def of_key(refusal: Refusal, record) -> Refusal:
    """``refusal``, naming the key it refused (for the usage row; never the plaintext)."""
    refusal.api_key, refusal.key_alias = record.token, record.key_alias
    return refusal


def refuse(reason: str) -> None:
    metrics.KEY_REFUSALS.labels(reason).inc()
