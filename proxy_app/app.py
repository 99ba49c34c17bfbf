"""The Flask application class: Flask, minus per-request work a proxy never uses.

Every request pays for what Flask prepares in case a view needs it. Two pieces of that
are replaced here, both through Flask's documented extension points:

- URL adapter (``create_url_adapter``): Flask binds the URL map to the request's Host
  header, parsing and IDNA-encoding it and checking it against ``SERVER_NAME``, for host
  and subdomain matching and external URL building. The proxy's routes match on path
  and method only, it builds no URLs, and the Host a caller sends is never used.
- Sessions (``session_interface``): with no secret key Flask opens a signed-cookie
  session, finds no key, then builds a new empty ``NullSession`` for every request. The
  proxy has no sessions; one shared empty session stands for all.
"""

from __future__ import annotations

from flask import Flask
from flask.sessions import NullSession
from flask.sessions import SessionInterface
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

    def create_url_adapter(self, request):
        if request is None:
            return super().create_url_adapter(None)
        # What Map.bind_to_environ builds, without the Host: no server name, the default
        # subdomain. request.path is PATH_INFO decoded, with one leading "/".
        return MapAdapter(
            self.url_map,
            "",
            request.script_root,
            self.url_map.default_subdomain or "",
            request.scheme,
            request.path,
            request.method,
        )
