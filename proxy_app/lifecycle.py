"""The config as held by the gunicorn master, so that ``kill -HUP`` can swap it safely.

gunicorn forks each worker from the master, so a worker starts with the master's memory:
the Settings validated here are the ones ``proxy_app/wsgi.py`` serves. On HUP the master
validates the config file (and its includes) again *before* it forks new workers; if the
new files are invalid it logs why and keeps the previous Settings, so the new workers serve
the old config and nothing stops. The master also brings the database's schema up to date,
at start and on HUP, before it forks (:func:`prepare_schema`; create_app does it outside
gunicorn).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from sqlalchemy.exc import SQLAlchemyError

from proxy_app import migrate
from proxy_app.config import ConfigError
from proxy_app.config import Settings
from proxy_app.config import load_config
from proxy_app.config import log_summary
from proxy_app.store import describe
from proxy_app.store import make_engine

log = logging.getLogger("proxy_app")
_current: Settings | None = None
# Whether the master brought the current database's schema up to date.
_schema_ready = False


def current() -> Settings | None:
    """The Settings the master validated last, or None when not under the master."""
    return _current


def schema_ready() -> bool:
    return _schema_ready


def load_at_start() -> Settings:
    """Validate the config and migrate the database once, before any worker exists.

    :raises ConfigError: the config cannot be served; the master should exit.
    """
    global _current, _schema_ready
    _current = load_config(None)
    log_summary(_current)
    _schema_ready = prepare_schema(_current)
    return _current


def reload_on_hup() -> bool:
    """Re-read the config on HUP; keep the previous one if the new one is invalid."""
    global _current, _schema_ready
    try:
        _current = load_config(None)
    except ConfigError as exc:
        for line in exc.problems:
            log.error("config error: %s", line)
        log.error("reload: the new config is invalid; still serving the previous one (%s)", _current and _current.source)
        return False
    log_summary(_current)
    _schema_ready = prepare_schema(_current)
    log.info("reload: serving the new config from %s (%d endpoints)", _current.source, len(_current.endpoints))
    return True


def prepare_schema(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    """Create or migrate the schema; False (logged) when the database cannot be reached.

    The proxy still starts then: open endpoints and the master key work, virtual keys get
    503, and each worker migrates once the database answers (proxy_app/notices.py).
    """
    engine = make_engine(settings.database_url, environ)
    try:
        version = migrate.upgrade(engine)
    except (SQLAlchemyError, migrate.MigrationLockBusy) as exc:
        log.error(
            "database %s unreachable at start (%s): virtual keys answer 503 and usage rows are held on disk until it answers",
            describe(settings.database_url, environ),
            type(getattr(exc, "orig", None) or exc).__name__,
        )
        return False
    finally:
        # The master forks workers next: none may inherit its pooled connections.
        engine.dispose()
    log.info("database %s: schema %s", describe(settings.database_url, environ), version)
    return True
