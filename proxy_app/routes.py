"""The pass-through routing table: one rule per configured path (and one per sub-path tree).

Entries that share a path with disjoint ``methods`` share a view; the view picks the entry
by method and answers 405 with an accurate ``Allow`` otherwise. The rules are added with
``methods=None`` so that every method reaches the view: Flask would otherwise answer
OPTIONS itself and Werkzeug would add HEAD to any GET rule.

Endpoints change at run time (proxy_app/endpoint_table.py), so the table is a whole Werkzeug
``Map`` built off the request path and swapped in one assignment
(``ProxyFlask.serving_map``, proxy_app/app.py): the proxy's own routes (health, metrics,
admin) copied in with ``Rule.empty()``, then the pass-through rules. Each pass-through rule
carries its view (:class:`PassThroughRule`): a request matched against one table runs that
table's view to the end, whatever tables are swapped in meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flask import request
from werkzeug.routing import BaseConverter
from werkzeug.routing import Map
from werkzeug.routing import Rule

from proxy_app.errors import METHOD_NOT_ALLOWED
from proxy_app.errors import refuse
from proxy_app.stored_endpoints import Unservable


class RestConverter(BaseConverter):
    """Everything after ``<path>/``, possibly empty or starting with "/".

    Werkzeug's ``path`` converter refuses both; the raw rest is re-read from RAW_URI
    anyway, this only decides that the request belongs to the route.
    """

    regex = ".*"
    part_isolating = False


class PassThroughRule(Rule):
    """A pass-through rule and its view (``ProxyFlask.dispatch_request`` runs it)."""

    def __init__(self, string: str, view, **options) -> None:
        super().__init__(string, **options)
        self.view = view


def build_map(own_rules: Iterable[Rule], endpoints: Iterable, forward) -> Map:
    """A new routing table: copies of ``own_rules`` and the rules of ``endpoints``
    (config Endpoints, stored ones, :class:`Unservable` ones), compiled before it serves."""
    rules = []
    for rule in own_rules:
        copy = rule.empty()
        # Flask's attribute, set after the rule was made: empty() does not carry it.
        copy.provide_automatic_options = getattr(rule, "provide_automatic_options", False)
        rules.append(copy)
    by_path: dict[str, list] = defaultdict(list)
    for endpoint in endpoints:
        by_path[endpoint.path].append(endpoint)
    for path, entries in by_path.items():
        exact = {method: e for e in entries for method in e.methods}
        rules.append(_rule(path, f"passthrough {path}", _view(exact, forward, subpath=False)))
        below = {method: e for e in entries if e.include_subpath for method in e.methods}
        if below:
            rules.append(_rule(path.rstrip("/") + "/<rest:rest>", f"passthrough {path}/*", _view(below, forward, subpath=True)))
    url_map = Map(rules, merge_slashes=False, converters={"rest": RestConverter})
    url_map.update()  # sort and compile now, not on the first request that uses it
    return url_map


def _rule(string: str, name: str, view) -> PassThroughRule:
    return PassThroughRule(string, view, endpoint=name, methods=None, merge_slashes=False, strict_slashes=True)


def _view(table: dict, forward, subpath: bool):
    allow = ", ".join(sorted(table))

    def view(rest=None):
        endpoint = table.get(request.method)
        if endpoint is None:
            return refuse(request.environ, 405, METHOD_NOT_ALLOWED, "method_not_allowed", [("Allow", allow)])
        if isinstance(endpoint, Unservable):
            return refuse(request.environ, 503, endpoint.message, "service_unavailable")
        return forward(endpoint, subpath)

    return view
