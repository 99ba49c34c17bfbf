"""Profile the WSGI app in-process (no gunicorn): CPU per request of the proxy's own code.

    .venv/bin/python bench/profile_app.py --upstream-port PORT [--n 20000] [--profile] [--keyed]

Needs an upstream that answers POST /v1/rerank on 127.0.0.1:PORT (bench/upstream.c, or
any fast server). Calls the app the way gunicorn does (environ, start_response, iterate,
close) with a Cohere-rerank-shaped request, and prints microseconds per request; with
--profile, the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


BODY = b'{"model":"rerank-english-v3.0","query":"What is the capital of the United States?","top_n":3,"documents":["Carson City is the capital city of the American state of Nevada.","Washington, D.C. is the capital of the United States."]}'


def environ_for(port: int) -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/bench/rerank",
        "QUERY_STRING": "",
        "RAW_URI": "/bench/rerank",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "4000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_HOST": "127.0.0.1:4000",
        "HTTP_USER_AGENT": "h2load nghttp2/1.52.0",
        "HTTP_ACCEPT": "*/*",
        "HTTP_AUTHORIZATION": "Bearer sk-1234",
        "wsgi.url_scheme": "http",
        "wsgi.input_terminated": True,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
    }


def one(app, base: dict) -> None:
    environ = dict(base)
    environ["wsgi.input"] = io.BytesIO(BODY)
    body = app(environ, lambda status, headers, exc_info=None: None)
    for _ in body:
        pass
    body.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keyed", action="store_true", help="an auth: true route and a virtual key with rpm_limit and max_parallel_requests (bench/keyed.py's scenario)")
    parser.add_argument("--dump", help="with --profile: write the pstats data to this file too")
    parser.add_argument("--production", action="store_true", help="access log on (to /dev/null) and multiprocess metrics, as under gunicorn")
    args = parser.parse_args()
    if args.production:
        import logging.config
        import os
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="profile-metrics-")
        # The access log writes to file descriptor 1 itself (logs.LineHandler): point it
        # at /dev/null and keep a copy of the real stdout for the result.
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        sys.stdout = open(saved, "w", closefd=False)  # noqa: SIM115
        from proxy_app.logs import logging_config

        logging.config.dictConfig(logging_config("info"))
    from proxy_app import create_app
    from proxy_app import patches

    # What the gunicorn worker applies at start (PROXY_SPEEDUPS=0 leaves the speed ones out).
    patches.apply([patches.UPSTREAM])
    config = {
        "general_settings": {
            "master_key": "sk-1234",
            "pass_through_endpoints": [
                {
                    "path": "/bench/rerank",
                    "target": f"http://127.0.0.1:{args.upstream_port}/v1/rerank",
                    "headers": {"Authorization": "bearer bench-cohere-key", "content-type": "application/json"},
                    "auth": args.keyed,
                }
            ],
        }
    }
    # The embedded SQLite database and usage spool in a directory of their own, never here.
    import tempfile

    app = create_app(config, environ={"STATE_DIRECTORY": tempfile.mkdtemp(prefix="profile-state-")})
    base = environ_for(args.upstream_port)
    if args.keyed:
        answer = app.test_client().post(
            "/key/generate",
            json={"rpm_limit": 10**9, "max_parallel_requests": 1000},
            headers={"Authorization": "Bearer sk-1234"},
        )
        base["HTTP_AUTHORIZATION"] = "Bearer " + answer.get_json()["key"]
    for _ in range(500):
        one(app, base)
    profiler = cProfile.Profile() if args.profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    for _ in range(args.n):
        one(app, base)
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    print(f"{cpu / args.n * 1e6:.1f} us CPU per request (n={args.n}, this process only{', profiled' if profiler else ''})")
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(35)
        if args.dump:
            stats.dump_stats(args.dump)


if __name__ == "__main__":
    main()
