"""Logging set-up shared by gunicorn (``logconfig_dict``) and the CLI.

- ``proxy_app.access``: one JSON line per request, to stdout, message only.
- ``proxy_app.debug``: ``--detailed_debug`` request traces (DEBUG), to stderr.
- ``proxy_app`` and gunicorn's own loggers: start-up, config and error lines, to stderr.
"""

from __future__ import annotations


def logging_config(level: str = "info", detailed_debug: bool = False) -> dict:
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"},
            "json_line": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "json_line", "stream": "ext://sys.stdout"},
        },
        # gunicorn merges this dict over its defaults key by key, so root and both of its
        # loggers are spelled out (its default root handler is not defined here).
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            # gunicorn writes its own access line whenever a logconfig_dict is set; the proxy
            # writes a better one (at body end, no query string), so silence gunicorn's.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            "proxy_app": {"level": level, "handlers": ["stderr"], "propagate": False},
            "proxy_app.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
            "proxy_app.debug": {"level": "DEBUG" if detailed_debug else "WARNING", "handlers": ["stderr"], "propagate": False},
        },
    }


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
