"""Command line: ``proxy-app`` / ``python -m proxy_app``.

    proxy-app [serve] [--config FILE] [--host HOST] [--port PORT] [--num_workers N] [--detailed_debug]
    proxy-app check [--config FILE] [--allow-missing-env]
    proxy-app --version

Serving runs gunicorn in this very process with the package's settings
(``python:proxy_app.gunicorn_conf``) and app (``proxy_app.wsgi:app``), so it works the same
from a checkout or an installed package, from any working directory, and the process left
running is the gunicorn master: ``kill -HUP <pid>`` reloads the config. LiteLLM users know
the flags from ``litellm --config config.yaml --detailed_debug``. Environment fallbacks:
``CONFIG_FILE_PATH``, ``PROXY_BIND`` and ``PORT`` (see :mod:`proxy_app.bind`),
``WEB_CONCURRENCY``, ``DETAILED_DEBUG``.

This module must not import prometheus_client (nor :mod:`proxy_app.factory`): gunicorn's
settings set PROMETHEUS_MULTIPROC_DIR after this module was imported, and the library fixes
its storage on import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sqlalchemy.exc import SQLAlchemyError

from proxy_app import endpoint_store
from proxy_app import migrate
from proxy_app import package_version
from proxy_app.bind import BindError
from proxy_app.bind import bind_address
from proxy_app.config import ConfigError
from proxy_app.config import Settings
from proxy_app.config import config_path
from proxy_app.config import load_config
from proxy_app.config import print_problems
from proxy_app.config import summary
from proxy_app.endpoint_secrets import cipher
from proxy_app.endpoint_store import StoredEndpoint
from proxy_app.store import describe
from proxy_app.store import make_engine
from proxy_app.store import sqlite_path
from proxy_app.stored_endpoints import Unservable
from proxy_app.stored_endpoints import resolve

GUNICORN_SETTINGS = "python:proxy_app.gunicorn_conf"
WSGI_APP = "proxy_app.wsgi:app"
COMMANDS = """\
commands:
  serve    run the proxy under gunicorn (the default when no command is given)
  check    validate a config and print its routes; exit 1 if it cannot be served
           (proxy-app check --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check(check_parser().parse_args(argv[1:]))
    parser = serve_parser()
    args = parser.parse_args(argv[1:] if argv[:1] == ["serve"] else argv)
    try:
        bind = bind_address(args.host, args.port, os.environ)
    except BindError as exc:
        parser.error(str(exc))
    if args.num_workers is not None and args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    return serve(args, bind)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxy-app",
        usage="%(prog)s [serve] [options]\n       %(prog)s check [--config FILE] [--allow-missing-env]",
        description="A synchronous pass-through proxy for LiteLLM-style pass_through_endpoints.",
        epilog=COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--config", "-c", metavar="FILE", help="config file (default: $CONFIG_FILE_PATH, else ./config.yaml)")
    parser.add_argument("--host", default=None, help="listen address; replaces only the host of $PROXY_BIND (default 0.0.0.0:4000)")
    parser.add_argument("--port", default=None, help="listen port; replaces only the port of $PROXY_BIND (default: $PORT)")
    parser.add_argument(
        "--num_workers", type=int, default=None, metavar="N", help="gunicorn worker processes (default: $WEB_CONCURRENCY, else 2)"
    )
    parser.add_argument("--detailed_debug", action="store_true", help="log each upstream call, credentials masked")
    return parser


def check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-app check", description="Validate a config and print its routes.")
    parser.add_argument("--config", "-c", metavar="FILE", help="config file (default: $CONFIG_FILE_PATH, else ./config.yaml)")
    parser.add_argument(
        "--allow-missing-env",
        action="store_true",
        help="report os.environ/ variables that are not set as warnings, not errors (to check a file where its secrets are not)",
    )
    return parser


def check(args: argparse.Namespace) -> int:
    """Print the route table and the start-up summary and exit 0, or every config error and exit 1."""
    try:
        settings = load_config(config_path(args.config), allow_missing_env=args.allow_missing_env)
    except ConfigError as exc:
        print_problems(exc)
        return 1
    store_line, stored = store_report(settings)
    served = [resolve(row, settings, os.environ, cipher(os.environ)) for row in stored]
    print(route_table(settings, list(zip(stored, served, strict=True))))
    for line in report(settings):
        print(line)
    for row, endpoint in zip(stored, served, strict=True):
        if isinstance(endpoint, Unservable):
            print(f"warning: stored endpoint {row.id}: {endpoint.message}")
    print(store_line)
    return 0


def store_report(settings: Settings, environ=os.environ) -> tuple[str, list[StoredEndpoint]]:
    """The database (password hidden), its schema version against this code's, and Redis; and
    the endpoints stored through the endpoint API, when the schema has them.

    Connecting is part of the check; an unreachable database is reported, not an error:
    the proxy starts without it (virtual keys answer 503 until it is back).
    """
    head = migrate.head_version()
    redis = "limit counters in Redis" if settings.redis_url else "limit counters in the database (no REDIS_URL)"
    if settings.database_url is None and not os.path.exists(sqlite_path(environ)):
        # Opening it would create it: a check leaves no state behind.
        return f"store: {describe(None, environ)}: not created yet (created at start, schema {head}); {redis}", []
    engine = make_engine(settings.database_url, environ)
    stored: list[StoredEndpoint] = []
    try:
        version = migrate.current_version(engine)
        if version is not None and version >= migrate.ENDPOINTS_REVISION:
            stored = endpoint_store.list_stored(engine)
    except SQLAlchemyError as exc:
        state = f"unreachable ({type(getattr(exc, 'orig', None) or exc).__name__})"
    else:
        if version is None:
            state = f"no schema yet (created at start: {head})"
        elif version == head:
            state = f"schema {version} (up to date)"
        else:
            state = f"schema {version} (migrated to {head} at start)"
    finally:
        engine.dispose()
    return f"store: {describe(settings.database_url, environ)}: {state}; {redis}", stored


def report(settings: Settings) -> list[str]:
    """What the proxy would log at start-up (:func:`proxy_app.config.summary`), then what
    ``--allow-missing-env`` let through."""
    lines = [f"warning: {line}" if level >= logging.WARNING else line for level, line in summary(settings)]
    lines += [f"warning: {line} (allowed by --allow-missing-env)" for line in settings.unresolved]
    return lines


def route_table(settings: Settings, stored: list | None = None) -> str:
    """Path, methods, target host, auth, injected header *names* and where each endpoint comes
    from (the config file, or the store with its id); never a value. ``stored``: (row, what
    :func:`proxy_app.stored_endpoints.resolve` made of it) pairs."""
    rows = [("PATH", "METHODS", "TARGET HOST", "AUTH", "SUBPATHS", "INJECTED HEADERS", "SOURCE")]
    for e in settings.endpoints:
        rows.append(_route_row(e, "config"))
    for row, endpoint in stored or ():
        if isinstance(endpoint, Unservable):
            rows.append((endpoint.path, ",".join(sorted(endpoint.methods)), "-", "-", "-", "-", f"stored {row.id} (cannot be served here)"))
        else:
            rows.append(_route_row(endpoint, f"stored {row.id}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    header = f"{settings.source}: {len(settings.endpoints)} endpoint(s), master key {'set' if settings.master_key else 'not set'}"
    if stored:
        header += f"; {len(stored)} stored endpoint(s)"
    return "\n".join([header, *lines])


def _route_row(e, source: str) -> tuple[str, ...]:
    return (
        e.path,
        ",".join(sorted(e.methods)),
        e.netloc or e.target,  # an unresolved os.environ/NAME target shows the reference
        "keys" if e.auth else "open",
        "yes" if e.include_subpath else "no",
        ", ".join(name for name, _ in e.headers) or "-",
        source,
    )


def serve(args: argparse.Namespace, bind: str) -> int:
    """Become the gunicorn master for the package's settings, with the CLI's choices.

    The choices travel as environment variables, read by proxy_app/gunicorn_conf.py, so the
    workers and a HUP reload see the same values.
    """
    os.environ["CONFIG_FILE_PATH"] = os.path.abspath(config_path(args.config))
    os.environ["PROXY_BIND"] = bind
    if args.detailed_debug:
        os.environ["DETAILED_DEBUG"] = "1"
    if args.num_workers:
        os.environ["WEB_CONCURRENCY"] = str(args.num_workers)
    from gunicorn.app.wsgiapp import WSGIApplication

    sys.argv = ["proxy-app", "-c", GUNICORN_SETTINGS, WSGI_APP]
    WSGIApplication("%(prog)s [OPTIONS]", prog="proxy-app").run()
    return 0
