"""The Flask application class: Flask, minus per-request work a proxy never uses.

Every request pays for what Flask prepares in case a view needs it. Two pieces of that
are replaced here, both through Flask's documented extension points:

- URL adapter (``create_url_adapter``): Flask binds the URL map to the request's Host
  header, parsing and IDNA-encoding it and checking it against ``SERVER_NAME``, for host
  and subdomain matching and external URL building. The proxy's routes match on path
  and method only, it builds no URLs, and the Host a caller sends is never used.
- Routing (``create_url_adapter``, ``dispatch_request``): requests are matched against
  ``serving_map``, the routing table proxy_app/routes.py builds and swaps in whole when
  endpoints change at run time, and a matched pass-through rule runs the view it carries.
  ``app.url_map`` keeps the proxy's own routes, copied into every table.
- Sessions (``session_interface``): with no secret key Flask opens a signed-cookie
  session, finds no key, then builds a new empty ``NullSession`` for every request. The
  proxy has no sessions; one shared empty session stands for all.
"""

from __future__ import annotations

from flask import Flask
from flask import request
from flask.sessions import NullSession
from flask.sessions import SessionInterface
from werkzeug.routing import Map
from werkzeug.routing import MapAdapter


class NoSessions(SessionInterface):
    """No session for anyone: one shared, read-only NullSession (writes raise)."""

    _null = NullSession()

    def open_session(self, app, request):
        return self._null

    def make_null_session(self, app):
        return self._null

    def save_session(self, app, session, response) -> None:
        return None


class ProxyFlask(Flask):
    session_interface = NoSessions()
    # The routing table requests are matched against; None until routes.build_map made one.
    serving_map: Map | None = None

    def create_url_adapter(self, request):
        if request is None:
            return super().create_url_adapter(None)
        # What Map.bind_to_environ builds, without the Host: no server name, the default
        # subdomain. request.path is PATH_INFO decoded, with one leading "/". The table is
        # read once: the request keeps it while another is swapped in.
        url_map = self.serving_map if self.serving_map is not None else self.url_map
        return MapAdapter(
            url_map,
            "",
            request.script_root,
            self.url_map.default_subdomain or "",
            request.scheme,
            request.path,
            request.method,
        )

    def dispatch_request(self):
        # A pass-through rule carries its view (proxy_app/routes.py PassThroughRule); the
        # proxy's own routes are Flask's, looked up in view_functions as usual.
        view = getattr(request.url_rule, "view", None)
        if view is None or request.routing_exception is not None:
            return super().dispatch_request()
        return view(**request.view_args)
