"""The endpoints a worker serves: the config file's, then the stored ones, resolved here.

:class:`EndpointTable` holds both lists and swaps a new routing table into the app
(proxy_app/routes.py) when the stored ones change. It reloads when the "endpoints" change
notice moves (proxy_app/notices.py, every worker, within a poll) and right after the
endpoint API changed something on this worker; never on a request's path.

A stored endpoint is resolved by each instance from its own environment and salt key
(proxy_app/stored_endpoints.py). One this instance cannot resolve still gets its route,
answering 503 with the name of what is missing, and an ERROR line names the endpoint and the
variable at every reload: it neither crashes the worker nor falls silent. A stored endpoint
whose path and method the config file now serves (a config change after a reload) is not
served; the config file's wins, and an ERROR line says so.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

from sqlalchemy.exc import SQLAlchemyError

from proxy_app import endpoint_store
from proxy_app import metrics
from proxy_app.config import Settings
from proxy_app.endpoint_rules import config_id
from proxy_app.endpoint_rules import overlap
from proxy_app.endpoint_secrets import cipher
from proxy_app.routes import build_map
from proxy_app.stored_endpoints import STORED_SOURCE
from proxy_app.stored_endpoints import Unservable
from proxy_app.stored_endpoints import resolve

log = logging.getLogger("proxy_app")


class EndpointTable:
    """The config file's endpoints and the stored ones, and the app's routing table built from both."""

    def __init__(self, app, settings: Settings, engine, forward, environ: Mapping[str, str] = os.environ) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine
        self.forward = forward
        self.environ = environ
        self.fernet = cipher(environ)
        self._lock = threading.Lock()

    def config_places(self) -> list[tuple[str, str, frozenset[str]]]:
        """(label, path, methods) of every config-file endpoint."""
        return [
            (f"the config file's pass_through_endpoints[{e.index}] (id {config_id(e.index)})", e.path, e.methods)
            for e in self.settings.endpoints
        ]

    def reload(self) -> None:
        """Read the stored endpoints and serve them; raises SQLAlchemyError when the database fails
        (the change watcher retries, and reloads once it is back)."""
        with self._lock:
            try:
                stored = endpoint_store.list_stored(self.engine)
            except SQLAlchemyError:
                metrics.STORE_ERRORS.labels("database", "endpoints").inc()
                raise
            self.swap(stored)

    def load_at_start(self) -> None:
        """The first load; a database that fails leaves the config file's endpoints served
        (the change watcher loads the stored ones once it answers)."""
        try:
            self.reload()
        except SQLAlchemyError as exc:
            log.warning(
                "database unreachable: serving the config file's endpoints only until it answers (%s)",
                type(getattr(exc, "orig", None) or exc).__name__,
            )
            with self._lock:
                self.swap(())

    def swap(self, stored) -> None:
        """Serve the config file's endpoints and ``stored`` (StoredEndpoint rows) from now on."""
        served: list = list(self.settings.endpoints)
        taken = self.config_places()
        for row in stored:
            try:
                endpoint = resolve(row, self.settings, self.environ, self.fernet)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a row not written by this code
                log.error("endpoint %s is not served: its stored row cannot be read (%s)", row.id, type(exc).__name__)
                continue
            clash = overlap(endpoint.path, endpoint.methods, taken)
            if clash is not None:
                log.error(
                    "endpoint %s (%s) is not served: %s already serves %s on that path; change or delete the stored endpoint",
                    row.id, endpoint.path, clash[0], ", ".join(clash[1]),
                )
                continue
            if isinstance(endpoint, Unservable):
                log.error("endpoint %s: %s", row.id, endpoint.message)
            served.append(endpoint)
            taken.append((f"{STORED_SOURCE} {row.id}", endpoint.path, endpoint.methods))
        # app.url_map holds the proxy's own routes (health, metrics, admin) only.
        url_map = build_map(self.app.url_map.iter_rules(), served, self.forward)
        self.app.serving_map = url_map  # one assignment: the next request matches against it
