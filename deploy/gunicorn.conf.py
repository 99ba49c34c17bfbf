"""gunicorn settings for proxy_app: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

Every setting can be overridden from the environment; defaults are for a small VM behind
nginx. gthread workers: a long stream holds one thread, not a whole process, and the
worker keeps heartbeating to the arbiter while it streams (a sync worker would be killed
mid-stream after ``timeout`` seconds, benoitc/gunicorn#1974).
"""

import os
import sys


def _int(name, default):
    return int(os.environ.get(name, default))


wsgi_app = "wsgi:app"
bind = os.environ.get("PROXY_BIND", "0.0.0.0:4000")
worker_class = "gthread"
workers = _int("WEB_CONCURRENCY", 2)
# One thread per concurrent request or open stream; the app sizes its upstream connection
# pool from the same variable.
threads = _int("PROXY_THREADS", 32)
# Open connections per worker, idle keep-alive ones included; above threads so keep-alive
# slots remain for nginx's pooled connections.
worker_connections = _int("PROXY_WORKER_CONNECTIONS", threads * 2)
# With gthread this is only a heartbeat deadline, not a request deadline.
timeout = _int("PROXY_TIMEOUT", 60)
# Long enough for streams in flight to finish on shutdown or reload.
graceful_timeout = _int("PROXY_GRACEFUL_TIMEOUT", 300)
# Above nginx's upstream keepalive_timeout (60 s): if gunicorn closed an idle connection
# first, nginx could reuse it at that moment and get a reset (a spurious 502).
keepalive = _int("PROXY_KEEPALIVE", 75)
loglevel = os.environ.get("PROXY_LOG_LEVEL", "info")
accesslog = None
errorlog = "-"
# Sockets pooled before a fork would be shared between workers (benoitc/gunicorn#1953).
preload_app = False
# gunicorn >= 25.1 opens a runtime control socket by default; the proxy does not need it,
# and a shared default path would collide between instances on one machine.
control_socket_disable = os.environ.get("PROXY_CONTROL_SOCKET", "") == ""
if not control_socket_disable:
    control_socket = os.environ["PROXY_CONTROL_SOCKET"]


def on_starting(server):
    """Validate the config once in the master, before any worker is forked."""
    from proxy_app.config import ConfigError
    from proxy_app.config import load_config

    try:
        load_config(None)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        sys.exit(1)
