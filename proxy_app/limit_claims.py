"""Claims: a busy worker takes several admissions of a key in one store transaction.

On the database limiter every admission is a write transaction: on the embedded SQLite
store it is most of what a limited key adds to a request (bench/README.md, "Claims"). A
worker that admits one key many times a second, far from the key's limits, takes ``k``
admissions at once instead: one transaction checks both limits for all ``k`` and counts all
``k`` in the store (``k`` rows in the rpm window, ``k`` on the worker's slot counter), and the
worker hands the other ``k - 1`` to its next requests of the key with no store I/O.

- **Never over a limit.** Every admission handed out was counted in the store, by a
  transaction that checked the limits with it counted. A claim's rows carry the claim's time
  plus :data:`CLAIM_SECONDS`, the last moment one of them can be handed out, so each stays in
  the window for at least 60 s after its use.
- **Exact near a limit.** A claim takes at most ``1 /`` :data:`SPREAD` of what is left under
  each limit (:func:`claim_size`): with fewer than ``2 * SPREAD`` admissions left (or a limit
  below that), every admission is its own transaction, exactly as without claims.
- **Little slack far from it.** A worker claims a quarter of its own demand for the key in the
  last :data:`CLAIM_SECONDS`, at most :data:`MAX_CLAIM`, so a quiet key is never claimed
  ahead. Admissions of a claim not handed out within :data:`CLAIM_SECONDS` are dropped: their
  slots are given back like releases, their rpm rows stay counted until they leave the
  window. That happens when a busy key goes quiet: at most ``MAX_CLAIM - 1`` per worker, only
  while at least ``SPREAD`` times as many were left.

The ``x-ratelimit-remaining-requests`` of a handed-out admission counts down from what its
claim's transaction saw; admissions that other workers made since are not in it.
"""

from __future__ import annotations

import os
import threading
import time

CLAIM_SECONDS = 0.25  # a claim's admissions are handed out within this long, or dropped
MAX_CLAIM = 16  # admissions taken by one transaction at most
SPREAD = 64  # a claim takes at most this fraction (1/SPREAD) of what is left under a limit
DEMAND_SHARE = 4  # a claim is at most this fraction of the worker's demand in CLAIM_SECONDS
MAX_KEYS = 100_000  # keys tracked per worker; beyond this, those holding nothing are forgotten


def claim_size(demand: int, rpm_limit: int | None, in_window: int, max_parallel: int | None, live: int) -> int:
    """How many admissions an allowed admission takes: 1 unless the worker's ``demand`` and what
    is left under both limits (``in_window`` and ``live`` counted before it) leave room for more."""
    size = min(MAX_CLAIM, demand // DEMAND_SHARE)
    if rpm_limit is not None:
        size = min(size, (rpm_limit - in_window) // SPREAD)
    if max_parallel is not None:
        size = min(size, (max_parallel - live) // SPREAD)
    return max(size, 1)


class _Key:
    """One key's claim in this worker, and the worker's demand for the key."""

    __slots__ = ("limits", "left", "until", "remaining", "reset_at", "period_end", "count", "previous")

    def __init__(self) -> None:
        self.limits: tuple = ()
        self.left = 0  # admissions claimed and not handed out yet
        self.until = 0.0  # monotonic time the claim's admissions are dropped at
        self.remaining: int | None = None  # rpm remaining after the next one handed out
        self.reset_at = 0.0  # monotonic time the window's oldest admission leaves it
        self.period_end = 0.0
        self.count = 0  # admissions (claimed or not) in the current period
        self.previous = 0  # ... in the previous one


class Claims:
    """This worker's claims, per key. Thread-safe; forgets everything after a fork."""

    def __init__(self, seconds: float = CLAIM_SECONDS, clock=time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._holding: dict[str, _Key] = {}  # the keys whose claim has admissions left
        self._pid = os.getpid()

    def take(self, token: str, limits: tuple, *, count: bool = True) -> tuple[int | None, float] | None:
        """One admission of this worker's claim on ``token`` (made under the same ``limits``):
        its rpm remaining and seconds to the window's reset; None when there is none to hand out
        (ask the store). Counts the demand either way, unless ``count`` is false (a second look
        by the same request)."""
        now = self._clock()
        with self._lock:
            if self._pid != os.getpid():
                self._keys, self._holding, self._pid = {}, {}, os.getpid()
            key = self._keys.get(token)
            if key is None:
                if len(self._keys) >= MAX_KEYS:
                    self._keys = {t: k for t, k in self._keys.items() if k.left}
                key = self._keys[token] = _Key()
            if now >= key.period_end:
                key.previous = key.count if now < key.period_end + self._seconds else 0
                key.count = 0
                key.period_end = now + self._seconds
            key.count += count
            if not key.left or now >= key.until or key.limits != limits:
                return None
            key.left -= 1
            remaining = key.remaining
            if remaining is not None:
                key.remaining = max(remaining - 1, 0)
            return remaining, (None if remaining is None else max(key.reset_at - now, 0.0))

    def demand(self, token: str) -> int:
        """This worker's admissions of ``token`` in the last :data:`CLAIM_SECONDS` or so."""
        key = self._keys.get(token)
        return max(key.count, key.previous) if key is not None else 0

    def keep(self, token: str, limits: tuple, size: int, remaining: int | None, reset_seconds: float | None) -> int:
        """Keep a claim of ``size`` admissions, one of which was just used (``remaining`` and
        ``reset_seconds`` are that one's); returns how many of the key's previous claim were
        never handed out (their slots are to be given back)."""
        now = self._clock()
        with self._lock:
            key = self._keys.get(token)
            if key is None:
                key = self._keys[token] = _Key()
            dropped, key.left = key.left, size - 1
            self._holding[token] = key
            key.limits = limits
            key.until = now + self._seconds
            key.remaining = None if remaining is None else max(remaining - 1, 0)
            key.reset_at = now + (reset_seconds or 0.0)
            return dropped

    def expired(self, everything: bool = False) -> list[tuple[str, int]]:
        """Drop the admissions of claims older than :data:`CLAIM_SECONDS` (all claims with
        ``everything``): ``(token, count)`` for those never handed out."""
        now = self._clock()
        dropped = []
        with self._lock:
            if self._pid != os.getpid():
                return []
            for token, key in list(self._holding.items()):
                if not key.left:
                    del self._holding[token]
                elif everything or now >= key.until:
                    dropped.append((token, key.left))
                    key.left = 0
                    del self._holding[token]
        return dropped
