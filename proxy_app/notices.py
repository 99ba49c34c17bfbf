"""Change notices: each worker learns within a fraction of a second that keys changed.

Every key change bumps a counter in ``proxy_changes`` in the same transaction as the change
(proxy_app/key_store.py). A daemon thread per worker reads those few rows every
POLL_SECONDS and calls the listeners of each counter that moved. The cost is one indexed
read of a tiny table per worker per poll, whatever the traffic, and it works the same on
SQLite and PostgreSQL and through restarts of either (no connection to keep listening on,
nothing to re-subscribe). A request never waits on it.

The thread also brings the schema up to date the first time it reaches a database that was
unreachable when the master started (proxy_app/migrate.py serialises that).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from proxy_app import metrics
from proxy_app.logs import Throttle
from proxy_app.migrate import MigrationLockBusy
from proxy_app.schema import changes

log = logging.getLogger("proxy_app")
# Revocation must reach every worker within 2 s; a poll every 0.5 s leaves room for a slow read.
POLL_SECONDS = 0.5


class ChangeWatcher:
    """Polls ``proxy_changes`` and calls ``listeners[name]()`` when its generation moves."""

    def __init__(self, engine, listeners: dict[str, Callable[[], None]], interval: float = POLL_SECONDS, ensure_schema=None):
        self.engine = engine
        self.listeners = listeners
        self.interval = interval
        self.ensure_schema = ensure_schema
        self.seen: dict[str, int] = {}
        self.stale = False
        self.healthy = True
        # A database outage is logged once a minute per process, not twice a second.
        self._outage_log = Throttle(60.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proxy-app-change-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """One poll: call the listener of every counter that moved since the last one."""
        if self.ensure_schema is not None:
            self.ensure_schema()
            self.ensure_schema = None
        with self.engine.connect() as conn:
            current = dict(conn.execute(select(changes.c.name, changes.c.generation)).all())
        for name, listener in self.listeners.items():
            generation = current.get(name, 0)
            # The first poll calls every listener (a change made between the worker's first
            # read and this poll would otherwise go unseen), and so does the first one after
            # an outage: what was cached is re-read, whatever the counters say (a counter row
            # restored from a backup could even have gone back).
            if self.stale or self.seen.get(name) != generation:
                listener()
            self.seen[name] = generation
        self.stale = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except (SQLAlchemyError, MigrationLockBusy) as exc:
                self._failed(exc)
            else:
                if not self.healthy:
                    log.warning("database reachable again (change notices)")
                self.healthy = True
            self._stop.wait(self.interval)

    def _failed(self, exc: SQLAlchemyError) -> None:
        metrics.STORE_ERRORS.labels("database", "notices").inc()
        # While the database is away no change can be seen: whatever is cached may be stale
        # once it returns, so everything is dropped on the first poll that succeeds again.
        self.stale = True
        self.healthy = False
        if self._outage_log.due():
            log.warning("database unreachable (change notices): %s", type(getattr(exc, "orig", None) or exc).__name__)
