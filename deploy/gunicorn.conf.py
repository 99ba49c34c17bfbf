"""gunicorn settings for proxy_app: ``gunicorn -c deploy/gunicorn.conf.py``.

Every setting can be overridden from the environment (names and defaults below and in the
README's Operations section); defaults suit a small VM behind nginx. Run from the checkout
(``chdir``), with ``CONFIG_FILE_PATH`` naming the proxy's config.

Worker model: gthread. A long SSE stream holds one thread, not a whole process, and the
worker keeps heartbeating to the master while it streams (a sync worker is killed
mid-stream after ``timeout`` seconds, benoitc/gunicorn#1974, and forces Connection: close).
"""

import os
import shutil
import sys
import tempfile

# prometheus_client picks its storage when first imported, so the multiprocess directory is
# settled before anything imports it. One directory per master, shared by its workers;
# systemd points it at /run/proxy-app/prometheus, elsewhere a fresh temporary one is made.
# Re-executed on HUP: the variable is then already set and the directory is kept.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="proxy-app-metrics-")

from proxy_app import lifecycle  # noqa: E402
from proxy_app.config import ConfigError  # noqa: E402
from proxy_app.config import print_problems  # noqa: E402
from proxy_app.logs import logging_config  # noqa: E402
from proxy_app.logs import truthy  # noqa: E402


def _int(name, default):
    return int(os.environ.get(name, default))


wsgi_app = "wsgi:app"
# Behind nginx on the same VM, bind to 127.0.0.1:4000 (PROXY_BIND); 0.0.0.0 is LiteLLM's
# default and what a container needs.
bind = os.environ.get("PROXY_BIND", "0.0.0.0:4000")
# gthread, answering an unsupported Transfer-Encoding with 400 instead of 501 (SPEC §8).
worker_class = "proxy_app.worker.ProxyThreadWorker"
# Processes: the proxy is I/O-bound and scales by threads; about one per core.
workers = _int("WEB_CONCURRENCY", 2)
# One thread per concurrent request or open stream. The app sizes its upstream connection
# pool from the same variable, so every thread can hold one pooled connection.
threads = _int("PROXY_THREADS", 32)
# Open connections per worker, idle keep-alive ones included. gunicorn answers with
# "Connection: close" once more than (worker_connections - threads) connections wait idle,
# and a caller that must reconnect costs the worker an accept and a new parser: at 2 x
# threads, 64 kept-alive callers on one worker lost about 5% of its throughput to that.
worker_connections = _int("PROXY_WORKER_CONNECTIONS", threads * 8)
# With gthread this is a heartbeat deadline for a stuck worker, not a request deadline:
# streams of any length are fine. Keep it above the slowest start-up.
timeout = _int("PROXY_TIMEOUT", 60)
# On shutdown or HUP, workers stop accepting and get this long to finish the requests and
# streams in flight before they are killed.
graceful_timeout = _int("PROXY_GRACEFUL_TIMEOUT", 300)
# Above nginx's upstream keepalive_timeout (60 s): if gunicorn closed an idle connection
# first, nginx could reuse it at that very moment and get a reset (a spurious 502).
keepalive = _int("PROXY_KEEPALIVE", 75)
loglevel = os.environ.get("PROXY_LOG_LEVEL", "info")
# The proxy writes its own JSON access line when a body is finished (streams included);
# gunicorn's line would be written before a streamed body ends and would carry the query.
accesslog = None
errorlog = "-"
logconfig_dict = logging_config(loglevel, truthy(os.environ.get("DETAILED_DEBUG")))
logger_class = "proxy_app.logs.QuietAccessLogger"
# Sockets pooled before a fork would be shared between workers (benoitc/gunicorn#1953);
# the app is imported by each worker after fork.
preload_app = False
# gunicorn >= 25.1 opens a runtime control socket by default; the proxy does not need it,
# and one default path would collide between instances on a machine. Opt in with a path.
control_socket_disable = not os.environ.get("PROXY_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["PROXY_CONTROL_SOCKET"]


def on_starting(server):
    """Validate the config once in the master, before any worker is forked."""
    _empty_metrics_dir()
    try:
        lifecycle.load_at_start()
    except ConfigError as exc:
        print_problems(exc)
        sys.exit(1)


def on_reload(server):
    """HUP: re-validate before new workers fork; an invalid config keeps the old one."""
    lifecycle.reload_on_hup()


def child_exit(server, worker):
    from proxy_app.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


def _empty_metrics_dir():
    # Samples left from a previous run would be added to this run's counters.
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)
