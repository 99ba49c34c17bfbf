"""The config as held by the gunicorn master, so that ``kill -HUP`` can swap it safely.

gunicorn forks each worker from the master, so a worker starts with the master's memory:
the Settings validated here are the ones ``proxy_app/wsgi.py`` serves. On HUP the master
validates the config file (and its includes) again *before* it forks new workers; if the
new files are invalid it logs why and keeps the previous Settings, so the new workers serve
the old config and nothing stops. Outside gunicorn (tests, ``check``) this module is unused.
"""

from __future__ import annotations

import logging

from proxy_app.config import ConfigError
from proxy_app.config import Settings
from proxy_app.config import load_config
from proxy_app.config import log_summary

log = logging.getLogger("proxy_app")
_current: Settings | None = None


def current() -> Settings | None:
    """The Settings the master validated last, or None when not under the master."""
    return _current


def load_at_start() -> Settings:
    """Validate the config once, before any worker exists.

    :raises ConfigError: the config cannot be served; the master should exit.
    """
    global _current
    _current = load_config(None)
    log_summary(_current)
    return _current


def reload_on_hup() -> bool:
    """Re-read the config on HUP; keep the previous one if the new one is invalid."""
    global _current
    try:
        _current = load_config(None)
    except ConfigError as exc:
        for line in exc.problems:
            log.error("config error: %s", line)
        log.error("reload: the new config is invalid; still serving the previous one (%s)", _current and _current.source)
        return False
    log_summary(_current)
    log.info("reload: serving the new config from %s (%d endpoints)", _current.source, len(_current.endpoints))
    return True
