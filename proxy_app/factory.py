"""The Flask app: :func:`create_app` (re-exported lazily as ``proxy_app.create_app``).

This module imports the request path, :mod:`proxy_app.metrics` and so prometheus_client.
It lives apart from ``proxy_app/__init__.py`` so that importing the package (the CLI, the
config, the gunicorn settings) does not import prometheus_client: that library picks its
value storage when first imported, and the gunicorn settings set PROMETHEUS_MULTIPROC_DIR
first (prometheus/client_python, "Multiprocess Mode").
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from flask import Flask

from proxy_app import admin
from proxy_app import endpoint_admin
from proxy_app import endpoint_store
from proxy_app import errors
from proxy_app import health
from proxy_app import lifecycle
from proxy_app import metrics
from proxy_app.app import ProxyFlask
from proxy_app.config import Settings
from proxy_app.config import load_config
from proxy_app.config import log_summary
from proxy_app.endpoint_table import EndpointTable
from proxy_app.forward import Forwarder
from proxy_app.logs import truthy
from proxy_app.observe import AccessLog
from proxy_app.stores import Stores
from proxy_app.upstream import Transport

DEFAULT_THREADS = 32


def create_app(config: str | os.PathLike | Mapping | Settings | None = None, environ: Mapping[str, str] = os.environ) -> Flask:
    """Build the proxy for a config file path, an already-parsed mapping, or Settings.

    :raises proxy_app.config.ConfigError: the config cannot be served.
    """
    if isinstance(config, Settings):
        settings = config  # validated (and summarised) by whoever loaded it
    else:
        settings = load_config(config, environ)
        log_summary(settings)
    app = ProxyFlask("proxy_app", static_folder=None)
    app.extensions["proxy_app"] = settings
    # One pooled connection per gunicorn thread (PROXY_THREADS, as in proxy_app/gunicorn_conf.py).
    transport = Transport(
        pool_maxsize=int(environ.get("PROXY_THREADS", DEFAULT_THREADS)),
        origins=len({e.origin for e in settings.endpoints}),
    )
    detailed_debug = truthy(environ.get("DETAILED_DEBUG"))
    # Under the gunicorn master the schema was brought up to date before this worker forked.
    schema_ready = lifecycle.schema_ready() if lifecycle.current() is not None else lifecycle.prepare_schema(settings, environ)
    stores = Stores(settings, environ, schema_ready=schema_ready)
    app.extensions["proxy_app.stores"] = stores
    errors.init_app(app)
    health.init_app(app, settings, stores.watcher)
    metrics.init_app(app)
    admin_api = admin.init_app(app, settings, stores.engine)
    table = EndpointTable(app, settings, stores.engine, Forwarder(settings, transport, detailed_debug, stores.gate), environ)
    endpoint_admin.init_app(app, admin_api, table)
    app.extensions["proxy_app.endpoints"] = table
    # After every route of the proxy's own is registered: each routing table copies them.
    table.load_at_start()
    stores.watcher.listeners[endpoint_store.ENDPOINTS] = table.reload
    app.wsgi_app = AccessLog(app.wsgi_app, usage=stores.usage, release=stores.gate.release)
    stores.start()
    stores.stop_with(app)
    return app
