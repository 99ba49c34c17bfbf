"""gunicorn settings and hooks for proxy_app.

    gunicorn -c python:proxy_app.gunicorn_conf          # the installed package (what proxy-app runs)
    gunicorn -c deploy/gunicorn.conf.py wsgi:app        # a checkout; that file takes everything from here

Every setting can be overridden from the environment (names and defaults below and in the
README's Operations section); defaults suit a small VM behind nginx. ``CONFIG_FILE_PATH``
names the proxy's config.

gunicorn takes every global of a config module whose name is one of its settings
(gunicorn/app/base.py, ``load_config_from_module_name_or_filename``), so the globals here
are settings and hooks, ``__all__`` lists exactly them, and every helper starts with "_".

The module is imported once per process: on HUP gunicorn reloads its config (and
re-executes deploy/gunicorn.conf.py) but gets this same module back, so the settings
computed at start and the metrics directory made at start stay the same.

Worker model: gthread. A long SSE stream holds one thread, not a whole process, and the
worker keeps heartbeating to the master while it streams (a sync worker is killed
mid-stream after ``timeout`` seconds, benoitc/gunicorn#1974, and forces Connection: close).
"""

import atexit
import logging
import os
import shutil
import sys
import tempfile

_METRICS_VAR = "PROMETHEUS_MULTIPROC_DIR"
_METRICS_PREFIX = "proxy-app-metrics-"
# (path, pid of the master that made it): the only directory on_exit may remove.
_own_metrics_dir: tuple[str, int] | None = None
_arbiter = None

# prometheus_client picks its storage when first imported, so the multiprocess directory is
# settled before anything imports it (nothing imported by this module or by the CLI does;
# tests/test_start_commands.py checks). One directory per master, shared by its workers.
# systemd points the variable at /run/proxy-app/prometheus, which is the operator's: it is
# emptied at start and never removed. Elsewhere a fresh temporary directory is made here and
# removed when the master exits.
if not os.environ.get(_METRICS_VAR):
    os.environ[_METRICS_VAR] = tempfile.mkdtemp(prefix=_METRICS_PREFIX)
    _own_metrics_dir = (os.environ[_METRICS_VAR], os.getpid())

from proxy_app import lifecycle  # noqa: E402 - after the metrics directory is settled
from proxy_app import package_version  # noqa: E402 - after the metrics directory is settled
from proxy_app.bind import DEFAULT_BIND  # noqa: E402 - after the metrics directory is settled
from proxy_app.config import ConfigError  # noqa: E402 - after the metrics directory is settled
from proxy_app.config import print_problems  # noqa: E402 - after the metrics directory is settled
from proxy_app.logs import logging_config  # noqa: E402 - after the metrics directory is settled
from proxy_app.logs import truthy  # noqa: E402 - after the metrics directory is settled

_log = logging.getLogger("proxy_app")


def _int(name, default):
    return int(os.environ.get(name, default))


# The package's own WSGI module: importable from any working directory.
wsgi_app = "proxy_app.wsgi:app"
# Behind nginx on the same VM, bind to 127.0.0.1:4000 (PROXY_BIND); 0.0.0.0 is LiteLLM's
# default and what a container needs.
bind = os.environ.get("PROXY_BIND") or DEFAULT_BIND
# gthread, answering an unsupported Transfer-Encoding with 400 instead of 501 (proxy_app/worker.py).
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
    global _arbiter
    _arbiter = server
    _empty_metrics_dir()
    package = os.path.dirname(os.path.abspath(sys.modules["proxy_app"].__file__))
    _log.info("proxy_app %s from %s", package_version(), package)
    try:
        lifecycle.load_at_start()
    except ConfigError as exc:
        print_problems(exc)
        _remove_own_metrics_dir()
        sys.exit(1)


def on_reload(server):
    """HUP: re-validate before new workers fork; an invalid config keeps the old one."""
    lifecycle.reload_on_hup()


def worker_exit(server, worker):
    """A worker stops (TERM, HUP, max-requests): write the usage rows it holds, stop its threads."""
    app = getattr(worker, "wsgi", None)
    stores = getattr(app, "extensions", {}).get("proxy_app.stores")
    if stores is not None:
        stores.stop()


def child_exit(server, worker):
    from proxy_app.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


def on_exit(server):
    """The master is stopping: remove the metrics directory it made (never the operator's)."""
    _remove_own_metrics_dir()


__all__ = [
    name
    for name in (
        "wsgi_app", "bind", "worker_class", "workers", "threads", "worker_connections", "timeout",
        "graceful_timeout", "keepalive", "loglevel", "accesslog", "errorlog", "logconfig_dict",
        "logger_class", "preload_app", "control_socket_disable", "control_socket",
        "on_starting", "on_reload", "worker_exit", "child_exit", "on_exit",
    )
    if name in globals()
]


def _empty_metrics_dir():
    # Samples left from a previous run would be added to this run's counters.
    path = os.environ[_METRICS_VAR]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)


def _remove_own_metrics_dir():
    """Remove the metrics directory if this process made it; idempotent.

    Not in a forked worker (it inherits this module and its atexit hook, but the master owns
    the directory), and not while a new master started by USR2 (``reexec_pid``) may be
    sharing it.
    """
    global _own_metrics_dir
    if _own_metrics_dir is None:
        return
    path, maker = _own_metrics_dir
    if os.getpid() != maker or (_arbiter is not None and _arbiter.reexec_pid):
        return
    _own_metrics_dir = None
    shutil.rmtree(path, ignore_errors=True)


# on_exit covers a normal stop; this covers every other way the master ends after this module
# was loaded (the listening address is taken, gunicorn --check-config, a crash in start-up).
atexit.register(_remove_own_metrics_dir)
