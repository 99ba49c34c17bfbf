"""The stateful parts of one worker: database engine, key checks, limiter, usage writer.

Built by create_app in each worker (after gunicorn forked it: pooled connections are never
shared between processes), started with it and stopped when the worker exits
(proxy_app/gunicorn_conf.py ``worker_exit``), or when the app is garbage collected outside
gunicorn. The gunicorn master brings the schema up to date before it forks
(proxy_app/lifecycle.py); outside gunicorn create_app does it.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping

from proxy_app import migrate
from proxy_app.config import Settings
from proxy_app.key_gate import KeyCache
from proxy_app.key_gate import KeyGate
from proxy_app.limiter import make_limiter
from proxy_app.notices import ChangeWatcher
from proxy_app.store import make_engine
from proxy_app.store import sqlite_path
from proxy_app.usage import UsageWriter

log = logging.getLogger("proxy_app")
# How long a stopping worker may spend writing the usage rows it still holds.
STOP_SECONDS = 10.0


def spool_dir(environ: Mapping[str, str]) -> str:
    """Where usage rows wait while the database is unreachable: PROXY_SPOOL_DIR, else
    ``usage-spool`` beside the SQLite file's place (``$STATE_DIRECTORY`` or the working
    directory), whichever database is used."""
    if environ.get("PROXY_SPOOL_DIR"):
        return os.path.abspath(environ["PROXY_SPOOL_DIR"])
    return os.path.join(os.path.dirname(sqlite_path(environ)), "usage-spool")


class Stores:
    def __init__(self, settings: Settings, environ: Mapping[str, str] = os.environ, *, schema_ready: bool):
        self.engine = make_engine(settings.database_url, environ)
        self.limiter = make_limiter(self.engine, settings.redis_url)
        self.cache = KeyCache(self.engine, settings.key_cache_ttl, settings.allow_requests_on_db_unavailable)
        self.gate = KeyGate(self.cache, self.limiter)
        self.usage = UsageWriter(self.engine, spool_dir(environ))
        self.watcher = ChangeWatcher(
            self.engine,
            {"keys": self.cache.clear},
            ensure_schema=None if schema_ready else (lambda: migrate.upgrade(self.engine)),
        )
        self._stopped = False

    def start(self) -> None:
        self.usage.start()
        self.watcher.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Write what is held, stop the threads; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.watcher.stop()
        self.usage.stop(timeout)
        self.limiter.close()
        self.engine.dispose()

    def stop_with(self, owner) -> None:
        """Stop when ``owner`` (the app) is garbage collected, if nothing stopped them before."""
        weakref.finalize(owner, Stores.stop, self)
