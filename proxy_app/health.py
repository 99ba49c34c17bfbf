"""Health endpoints: no auth, no upstream call, LiteLLM's answers.

Readiness reports the database as this worker last saw it (its change watcher polls it twice
a second, proxy_app/notices.py), so a probe never waits on the database; the proxy stays
ready while it is down (open endpoints, the master key and recently verified keys work).
"""

from __future__ import annotations

from flask import Response


def init_app(app, settings, watcher) -> None:
    count = len(settings.endpoints)

    def liveness():
        return Response('"I\'m alive!"', content_type="application/json")

    def readiness():
        db = "connected" if watcher.healthy else "unreachable"
        return Response(f'{{"status":"healthy","db":"{db}","endpoints":{count}}}', content_type="application/json")

    app.add_url_rule("/health/liveliness", "health_liveliness", liveness, methods=["GET"])
    app.add_url_rule("/health/liveness", "health_liveness", liveness, methods=["GET"])
    app.add_url_rule("/health/readiness", "health_readiness", readiness, methods=["GET"])
