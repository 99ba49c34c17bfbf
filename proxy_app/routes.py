"""Register one Flask view per configured path (and one per sub-path tree).

Entries that share a path with disjoint ``methods`` share a view; the view picks the entry
by method and answers 405 with an accurate ``Allow`` otherwise. The rules are added with
``methods=None`` so that every method reaches the view: Flask would otherwise answer
OPTIONS itself and Werkzeug would add HEAD to any GET rule.
"""

from __future__ import annotations

from collections import defaultdict

from flask import request
from werkzeug.routing import BaseConverter
from werkzeug.routing import Rule

from proxy_app.config import Endpoint
from proxy_app.errors import METHOD_NOT_ALLOWED
from proxy_app.errors import refuse


class RestConverter(BaseConverter):
    """Everything after ``<path>/``, possibly empty or starting with "/".

    Werkzeug's ``path`` converter refuses both; the raw rest is re-read from RAW_URI
    anyway, this only decides that the request belongs to the route.
    """

    regex = ".*"
    part_isolating = False


def init_app(app, endpoints: tuple[Endpoint, ...], forward) -> None:
    app.url_map.converters["rest"] = RestConverter
    app.url_map.merge_slashes = False
    by_path: dict[str, list[Endpoint]] = defaultdict(list)
    for endpoint in endpoints:
        by_path[endpoint.path].append(endpoint)
    for path, entries in by_path.items():
        exact = {method: e for e in entries for method in e.methods}
        _add(app, path, f"passthrough {path}", _view(exact, forward, subpath=False))
        below = {method: e for e in entries if e.include_subpath for method in e.methods}
        if below:
            rule = path.rstrip("/") + "/<rest:rest>"
            _add(app, rule, f"passthrough {path}/*", _view(below, forward, subpath=True))


def _add(app, rule: str, name: str, view) -> None:
    app.url_map.add(Rule(rule, endpoint=name, methods=None, merge_slashes=False, strict_slashes=True))
    app.view_functions[name] = view


def _view(table: dict[str, Endpoint], forward, subpath: bool):
    allow = ", ".join(sorted(table))

    def view(rest=None):
        endpoint = table.get(request.method)
        if endpoint is None:
            return refuse(request.environ, 405, METHOD_NOT_ALLOWED, "method_not_allowed", [("Allow", allow)])
        return forward(endpoint, subpath)

    return view
