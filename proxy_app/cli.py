"""Command line: ``python -m proxy_app`` / ``proxy-app``.

    proxy-app --config config.yaml [--host 0.0.0.0] [--port 4000] [--num_workers N] [--detailed_debug]
    proxy-app check --config config.yaml

Serving runs gunicorn in this very process with the settings of deploy/gunicorn.conf.py, so
the process left running is the gunicorn master: ``kill -HUP <pid>`` reloads the config.
LiteLLM users know the flags from ``litellm --config config.yaml --detailed_debug``.
Environment fallbacks: ``CONFIG_FILE_PATH``, ``PORT``, ``DETAILED_DEBUG``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from proxy_app.config import ConfigError
from proxy_app.config import Settings
from proxy_app.config import config_path
from proxy_app.config import load_config
from proxy_app.config import print_problems

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check(_check_parser().parse_args(argv[1:]))
    return serve(_serve_parser().parse_args(argv[1:] if argv[:1] == ["serve"] else argv))


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-app", description="Serve the pass-through proxy under gunicorn.")
    parser.add_argument("--config", "-c", help="config file (default: $CONFIG_FILE_PATH, else ./config.yaml)")
    parser.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default: $PORT, else 4000)")
    parser.add_argument("--num_workers", type=int, default=None, help="gunicorn worker processes (default: $WEB_CONCURRENCY, else 2)")
    parser.add_argument("--detailed_debug", action="store_true", help="log each upstream call, credentials masked")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy-app check", description="Validate a config and print its routes.")
    parser.add_argument("--config", "-c", help="config file (default: $CONFIG_FILE_PATH, else ./config.yaml)")
    return parser


def check(args: argparse.Namespace) -> int:
    """Print the route table and exit 0, or every config error and exit 1."""
    try:
        settings = load_config(config_path(args.config))
    except ConfigError as exc:
        print_problems(exc)
        return 1
    print(route_table(settings))
    return 0


def route_table(settings: Settings) -> str:
    """Path, methods, target host, auth and injected header *names*; never a value."""
    rows = [("PATH", "METHODS", "TARGET HOST", "AUTH", "SUBPATHS", "INJECTED HEADERS")]
    for e in settings.endpoints:
        rows.append(
            (
                e.path,
                ",".join(sorted(e.methods)),
                e.netloc,
                "master key" if e.auth else "open",
                "yes" if e.include_subpath else "no",
                ", ".join(name for name, _ in e.headers) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    header = f"{settings.source}: {len(settings.endpoints)} endpoint(s), master key {'set' if settings.master_key else 'not set'}"
    return "\n".join([header, *lines])


def serve(args: argparse.Namespace) -> int:
    """Become the gunicorn master for deploy/gunicorn.conf.py with the CLI's settings."""
    os.environ["CONFIG_FILE_PATH"] = os.path.abspath(config_path(args.config))
    if args.detailed_debug:
        os.environ["DETAILED_DEBUG"] = "1"
    port = args.port or os.environ.get("PORT")
    if args.host or port or not os.environ.get("PROXY_BIND"):
        os.environ["PROXY_BIND"] = f"{args.host or '0.0.0.0'}:{port or 4000}"
    if args.num_workers:
        os.environ["WEB_CONCURRENCY"] = str(args.num_workers)
    from gunicorn.app.wsgiapp import WSGIApplication

    sys.argv = ["proxy-app", "-c", str(GUNICORN_CONF), "--chdir", str(ROOT)]
    WSGIApplication("%(prog)s [OPTIONS]", prog="proxy-app").run()
    return 0
