"""Health endpoints: no auth, no upstream call, LiteLLM's answers."""

from __future__ import annotations

from flask import Response


def init_app(app, settings) -> None:
    ready_body = f'{{"status":"healthy","db":"Not connected","endpoints":{len(settings.endpoints)}}}'

    def liveness():
        return Response('"I\'m alive!"', content_type="application/json")

    def readiness():
        return Response(ready_body, content_type="application/json")

    app.add_url_rule("/health/liveliness", "health_liveliness", liveness, methods=["GET"])
    app.add_url_rule("/health/liveness", "health_liveness", liveness, methods=["GET"])
    app.add_url_rule("/health/readiness", "health_readiness", readiness, methods=["GET"])
