"""Floors for bench/bench.py --app: what gunicorn and Flask cost before any proxying.

    .venv/bin/python bench/bench.py --app bench.floor_apps:constant        # gunicorn alone
    .venv/bin/python bench/bench.py --app bench.floor_apps:flask_constant  # + Flask

Both read the request body and answer the upstream's 320-byte JSON themselves, under the
production gunicorn settings (deploy/gunicorn.conf.py, the proxy's worker class): the
proxy's CPU per request minus these is what forwarding costs.
"""

from __future__ import annotations

from flask import Response
from flask import request

from proxy_app.app import ProxyFlask

ANSWER = b'{"id":"bench","results":[{"index":1,"relevance_score":0.99}]}'.ljust(320, b" ")
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))]


def constant(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", list(HEADERS))
    return [ANSWER]


flask_constant = ProxyFlask(__name__)


@flask_constant.route("/bench/rerank", methods=["POST"])
def rerank():
    request.environ["wsgi.input"].read()
    return Response(ANSWER, headers=HEADERS)
