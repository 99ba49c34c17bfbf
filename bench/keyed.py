"""Measure what a virtual key costs: an ``auth: true`` route against an open one, same proxy, same run.

    .venv/bin/python bench/keyed.py [--seconds 5] [--concurrency 64] [--reps 3] [--stores sqlite,redis]
    .venv/bin/python bench/keyed.py --smoke          # a few seconds, as CI runs it

The setup is bench/bench.py's (its functions are imported, not copied): bench/upstream.c
compiled with ``cc`` and started with an expected ``Authorization``, the production stack
``gunicorn -c deploy/gunicorn.conf.py -w 1`` (default threads), h2load in closed loop with the
same ~300-byte POST, and with two or more cores the proxy pinned to CPU 1 and everything else
(upstream, h2load, redis-server) to CPU 0. The proxy's config has two routes to the same
upstream, both injecting the upstream's key:

- ``/bench/rerank``, open (no ``auth``), driven exactly as bench.py drives it
  (``Authorization: Bearer sk-1234``, which the proxy strips);
- ``/bench/keyed``, ``auth: true``, driven with a virtual key made through ``POST
  /key/generate`` with an ``rpm_limit`` too high to trip and a ``max_parallel_requests``, so
  every request goes through the key check, both limits and the usage row.

Every pass-through request queues a usage row (written in batches by a worker thread), the
open route's too: both sides of the ratio pay for it. Run once per store (``--stores``):
``sqlite``, the default (limit counters and usage in ``$STATE_DIRECTORY/proxy_app.db``, a
fresh temporary directory), and ``redis`` (a private ``redis-server`` without persistence;
``REDIS_URL`` moves the limit counters there, usage stays in SQLite). Before measuring, it
checks that the keyed route answers 200 (the upstream answers 401 unless the proxy injected
its key), that a wrong key gets 401 and that the open route answers 200. The open and keyed
loads alternate within every repetition (the first one switching each time), so drift on a
shared machine hits both. Reported per store: medians of requests/s, exact p50/p99 from
h2load's per-request log, the worker's CPU time per request, the keyed/open throughput
ratio against the target (0.8x on SQLite, 0.7x on Redis: reported, not asserted), and
the usage rows found in the database after the proxy stopped (it writes what it holds when
it stops) against the requests sent.

Needs what bench.py needs, plus redis-server for ``--stores redis``
(apt-get install gcc nghttp2-client util-linux redis-server).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ is not a package and "bench" would name either this directory or bench/bench.py
# depending on how this file is started; loading the file by path is unambiguous.
_spec = importlib.util.spec_from_file_location("proxy_app_bench", HERE / "bench.py")
single = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(single)

MASTER_KEY = "sk-1234"
TARGETS = {"sqlite": 0.8, "redis": 0.7}  # keyed / open throughput, from the issue
RPM_LIMIT = 100_000_000  # never trips: 64 callers do well under a million requests a minute
MAX_PARALLEL = 1000  # above any --concurrency used here, so no request is refused
# Store settings the caller's environment may hold: each run sets its own.
STORE_ENV = ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "STATE_DIRECTORY", "PROXY_SPOOL_DIR")


def request(port: int, path: str, authorization: str | None, body: bytes = single.BODY) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"content-type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        conn.request("POST", path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def generate_key(port: int, max_parallel: int) -> str:
    fields = {"key_alias": "bench", "rpm_limit": RPM_LIMIT, "max_parallel_requests": max_parallel}
    status, body = request(port, "/key/generate", f"Bearer {MASTER_KEY}", json.dumps(fields).encode())
    if status != 200:
        raise SystemExit(f"POST /key/generate answered {status}: {body[:300]!r}")
    return json.loads(body)["key"]


def check_routes(port: int, key: str) -> None:
    """The keyed route works only with the key, and the upstream got the injected one."""
    expected = {
        ("/bench/keyed", f"Bearer {key}"): 200,  # 200 from the upstream: the proxy injected its key
        ("/bench/keyed", "Bearer sk-not-a-key"): 401,
        ("/bench/keyed", None): 401,
        ("/bench/rerank", f"Bearer {MASTER_KEY}"): 200,
    }
    for (path, authorization), want in expected.items():
        status, body = request(port, path, authorization)
        if status != want:
            shown = "a virtual key" if authorization and key in authorization else authorization
            raise SystemExit(f"POST {path} with {shown}: {status} (expected {want}): {body[:300]!r}")


def usage_rows(state_dir: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{state_dir / 'proxy_app.db'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM proxy_spend_logs").fetchone()[0]
    except sqlite3.Error:
        return None


def start_redis(workdir: Path, cpu: int | None) -> tuple[subprocess.Popen, str]:
    port = single.free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    proc = subprocess.Popen(single.pinned(cpu, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    single.wait_listening(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)  # the worker writes the usage rows it holds first
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_store(store: str, args, workdir: Path, upstream_port: int, cpus: tuple[int | None, int | None]) -> dict:
    load_cpu, proxy_cpu = cpus
    state_dir = workdir / f"state-{store}"
    state_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in STORE_ENV}
    env.update(
        COHERE_API_KEY=single.KEY,
        CONFIG_FILE_PATH=str(workdir / "config.yaml"),
        PROMETHEUS_MULTIPROC_DIR=str(workdir / f"prometheus-{store}"),
        STATE_DIRECTORY=str(state_dir),
    )
    if args.threads:
        env["PROXY_THREADS"] = args.threads
    procs: list[subprocess.Popen] = []
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proxy_port = single.free_port()
    try:
        if store == "redis":
            redis, env["REDIS_URL"] = start_redis(state_dir, load_cpu)
            procs.append(redis)
        log = open(workdir / f"gunicorn-{store}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            single.pinned(proxy_cpu, [str(gunicorn), "-c", "deploy/gunicorn.conf.py", "-w", "1", "-b", f"127.0.0.1:{proxy_port}"]),
            cwd=single.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
        ))
        single.wait_listening(proxy_port)
        (worker,) = single.wait_workers(procs[-1].pid)
        key = generate_key(proxy_port, args.max_parallel)
        check_routes(proxy_port, key)
        routes = {"open": ("/bench/rerank", f"Bearer {MASTER_KEY}"), "keyed": ("/bench/keyed", f"Bearer {key}")}
        runs = {name: [] for name in routes}
        cpu = {name: [] for name in routes}
        switches = {name: [] for name in routes}
        sent = 4  # check_routes' requests (the refused ones are recorded too)
        for rep in range(args.reps):
            for name in (["open", "keyed"] if rep % 2 == 0 else ["keyed", "open"]):
                path, authorization = routes[name]
                before, switched = single.cpu_seconds(worker), context_switches(worker)
                result = single.h2load(
                    f"http://127.0.0.1:{proxy_port}{path}", authorization, args.concurrency, args.seconds, workdir, load_cpu
                )
                cpu[name].append((single.cpu_seconds(worker) - before) / max(result["done"], 1) * 1e6)
                switches[name].append((context_switches(worker) - switched) / max(result["done"], 1))
                runs[name].append(result)
                sent += result["done"]
        stop(procs.pop())
        log.close()
        return {"store": store, "runs": runs, "cpu": cpu, "switches": switches, "sent": sent, "rows": usage_rows(state_dir)}
    finally:
        for proc in reversed(procs):
            stop(proc)


def context_switches(pid: int) -> int:
    """The worker's context switches so far, its threads' included (voluntary: it waited on a
    lock, the GIL or I/O; involuntary: the scheduler took the CPU away)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def report(results: list[dict], args, split: bool) -> int:
    print(f"proxy_app keyed bench: {os.cpu_count()} cores, proxy {'on CPU 1' if split else 'unpinned'}, "
          f"c={args.concurrency}, max_parallel_requests {args.max_parallel}, {args.reps} x {args.seconds:g} s per route, open and keyed alternating, medians; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| store | open req/s | keyed req/s | keyed/open | target | open p50 / p99 ms | keyed p50 / p99 ms "
          "| open CPU us/req | keyed CPU us/req | context switches per request, open / keyed "
          "| usage rows / requests answered | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for r in results:
        med = {name: {k: statistics.median(run[k] for run in runs) for k in ("rps", "p50", "p99")} for name, runs in r["runs"].items()}
        ratio = med["keyed"]["rps"] / med["open"]["rps"] if med["open"]["rps"] else float("nan")
        target = TARGETS[r["store"]]
        lost = sum(run["failed"] for runs in r["runs"].values() for run in runs)
        failed += lost
        rows = "?" if r["rows"] is None else f"{r['rows']:,}"
        print(
            f"| {r['store']} | {med['open']['rps']:,.0f} | {med['keyed']['rps']:,.0f} | {ratio:.2f}x | "
            f">= {target}x: {'met' if ratio >= target else 'NOT met'} | "
            f"{med['open']['p50']:.2f} / {med['open']['p99']:.2f} | {med['keyed']['p50']:.2f} / {med['keyed']['p99']:.2f} | "
            f"{statistics.median(r['cpu']['open']):.0f} | {statistics.median(r['cpu']['keyed']):.0f} | "
            f"{statistics.median(r['switches']['open']):.1f} / {statistics.median(r['switches']['keyed']):.1f} | "
            f"{rows} / {r['sent']:,} | {lost} |"
        )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stores", default="sqlite,redis", help="comma-separated: sqlite, redis")
    parser.add_argument("--threads", default=None, help="PROXY_THREADS for the worker (default: the conf's)")
    parser.add_argument(
        "--max-parallel", type=int, default=MAX_PARALLEL,
        help="the key's max_parallel_requests (default %(default)s); within 128 of --concurrency, most "
        "admissions on the database store are one transaction each (proxy_app/limit_claims.py)",
    )
    parser.add_argument("--smoke", action="store_true", help="one short point per store: proves the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.concurrency, args.reps = 1, 8, 1
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = [s for s in stores if s not in TARGETS]
    if unknown or not stores:
        raise SystemExit(f"--stores: unknown {', '.join(unknown) or '(none given)'}; use sqlite, redis")
    tools = ["cc", "h2load", *(["redis-server"] if "redis" in stores else [])]
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install gcc nghttp2-client redis-server)")
    split = (os.cpu_count() or 1) >= 2
    cpus = (0, 1) if split else (None, None)

    with tempfile.TemporaryDirectory(prefix="proxy-app-keyed-bench-") as tmp:
        workdir = Path(tmp)
        subprocess.run(["cc", "-O2", "-o", str(workdir / "upstream"), str(single.ROOT / "bench" / "upstream.c")], check=True)
        upstream_port = single.free_port()
        target = f"http://127.0.0.1:{upstream_port}/v1/rerank"
        inject = '      headers:\n        Authorization: "bearer os.environ/COHERE_API_KEY"\n        content-type: application/json\n'
        (workdir / "config.yaml").write_text(
            f"general_settings:\n  master_key: {MASTER_KEY}\n  pass_through_endpoints:\n"
            f"    - path: /bench/rerank\n      target: {target}\n{inject}"
            f"    - path: /bench/keyed\n      target: {target}\n      auth: true\n{inject}"
        )
        upstream = subprocess.Popen(
            single.pinned(cpus[0], [str(workdir / "upstream"), "-p", str(upstream_port), "-a", f"bearer {single.KEY}"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            single.wait_listening(upstream_port)
            results = [run_store(store, args, workdir, upstream_port, cpus) for store in stores]
        finally:
            stop(upstream)
        return report(results, args, split)


if __name__ == "__main__":
    sys.exit(main())
