"""Measure proxy_app on this machine: throughput, CPU and added latency per request.

    .venv/bin/python bench/bench.py [--seconds 5] [--concurrency 1,8,64] [--reps 3]
    .venv/bin/python bench/bench.py --smoke          # a few seconds, as CI runs it

What runs (everything on 127.0.0.1, ports picked by the OS, every load bounded in time):

- the upstream: bench/upstream.c (a one-thread epoll server answering a fixed ~320-byte
  Cohere-rerank JSON; it costs a few microseconds per request), compiled with ``cc``;
- the proxy: the production stack, ``gunicorn -c deploy/gunicorn.conf.py -w 1``, with a
  config whose ``/bench/rerank`` forwards to the upstream and injects ``Authorization``;
- the load: ``h2load`` (Debian's nghttp2-client) in closed loop, ``--h1``, one thread,
  a ~300-byte JSON POST like the example config's Cohere rerank call.

With two or more cores the proxy is pinned to CPU 1 and the upstream and h2load to CPU 0
(``taskset``), so the numbers read as "what one core of the proxy does". The same load
against the upstream directly is the floor ("direct"). Reported per point: requests/s,
exact p50/p99 from h2load's per-request log, p50 added over direct, and the proxy worker's
CPU time per request. Nothing here is asserted: CI only checks that it runs (--smoke).

Needs: cc, h2load, taskset (apt-get install gcc nghttp2-client util-linux).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = (
    b'{"model":"rerank-english-v3.0","query":"What is the capital of the United States?","top_n":3,'
    b'"documents":["Carson City is the capital city of the American state of Nevada.",'
    b'"Washington, D.C. is the capital of the United States."]}'
)
KEY = "bench-cohere-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None and shutil.which("taskset") else argv


def wait_listening(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds}s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def h2load(url: str, authorization: str, concurrency: int, seconds: float, workdir: Path, cpu: int | None) -> dict:
    body_file = workdir / "body.json"
    body_file.write_bytes(BODY)
    log_file = workdir / "h2load.log"
    log_file.unlink(missing_ok=True)  # h2load appends
    argv = [
        "h2load", "--h1", "-t1", f"-c{concurrency}", "-D", f"{round(seconds * 1000)}ms", "-d", str(body_file),
        "-H", "content-type: application/json", "-H", f"Authorization: {authorization}",
        f"--log-file={log_file}", url,
    ]
    out = subprocess.run(pinned(cpu, argv), capture_output=True, text=True, timeout=seconds + 30).stdout
    done = failed = 0
    for line in out.splitlines():
        if line.startswith("requests:"):
            parts = line.replace(",", "").split()
            done, failed = int(parts[parts.index("succeeded") - 1]), int(parts[parts.index("failed") - 1])
    latencies = []
    for line in log_file.read_text().splitlines():
        _, status, micros = line.split("\t")
        if status == "200":
            latencies.append(int(micros) / 1000)
        else:
            failed += 1
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "done": done,
        "failed": failed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default=None, help="PROXY_THREADS for the worker (default: the conf's)")
    parser.add_argument("--smoke", action="store_true", help="one short point: proves the bench runs")
    parser.add_argument("--app", default=None, help="another WSGI app in the proxy's place (e.g. bench.floor_apps:constant)")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.concurrency, args.reps = 1, "8", 1
    missing = [tool for tool in ("cc", "h2load") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install gcc nghttp2-client)")
    split = (os.cpu_count() or 1) >= 2
    load_cpu, proxy_cpu = (0, 1) if split else (None, None)
    gunicorn = Path(sys.executable).with_name("gunicorn")

    with tempfile.TemporaryDirectory(prefix="proxy-app-bench-") as tmp:
        workdir = Path(tmp)
        subprocess.run(["cc", "-O2", "-o", str(workdir / "upstream"), str(ROOT / "bench" / "upstream.c")], check=True)
        upstream_port, proxy_port = free_port(), free_port()
        config = workdir / "config.yaml"
        config.write_text(
            "general_settings:\n  master_key: sk-1234\n  pass_through_endpoints:\n"
            f"    - path: /bench/rerank\n      target: http://127.0.0.1:{upstream_port}/v1/rerank\n"
            "      headers:\n        Authorization: \"bearer os.environ/COHERE_API_KEY\"\n"
            "        content-type: application/json\n"
        )
        env = {
            **os.environ,
            "COHERE_API_KEY": KEY,
            "CONFIG_FILE_PATH": str(config),
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prometheus"),
            # The embedded SQLite database and usage spool, in the run's own directory.
            "STATE_DIRECTORY": str(workdir / "state"),
        }
        if args.threads:
            env["PROXY_THREADS"] = args.threads
        procs = []
        try:
            procs.append(subprocess.Popen(
                pinned(load_cpu, [str(workdir / "upstream"), "-p", str(upstream_port), "-a", f"bearer {KEY}"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            wait_listening(upstream_port)
            started = time.monotonic()
            procs.append(subprocess.Popen(
                pinned(proxy_cpu, [str(gunicorn), "-c", "deploy/gunicorn.conf.py", "-w", "1", "-b", f"127.0.0.1:{proxy_port}", *([args.app] if args.app else [])]),
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "gunicorn.log", "w"),  # noqa: SIM115
            ))
            wait_listening(proxy_port)
            startup = time.monotonic() - started
            (worker,) = wait_workers(procs[-1].pid)
            rss_idle = rss_mib(worker)
            rows = []
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                direct, proxied, cpu = [], [], []
                for _ in range(args.reps):
                    # direct: the caller must hold the upstream's own key; through the proxy
                    # it sends the proxy key, which the proxy replaces.
                    direct.append(h2load(f"http://127.0.0.1:{upstream_port}/v1/rerank", f"bearer {KEY}", concurrency, args.seconds, workdir, load_cpu))
                    before = cpu_seconds(worker)
                    result = h2load(f"http://127.0.0.1:{proxy_port}/bench/rerank", "Bearer sk-1234", concurrency, args.seconds, workdir, load_cpu)
                    cpu.append((cpu_seconds(worker) - before) / max(result["done"], 1) * 1e6)
                    proxied.append(result)
                rows.append((concurrency, direct, proxied, cpu))
            print(f"{args.app or 'proxy_app'} bench: {os.cpu_count()} cores, proxy {'on CPU 1' if split else 'unpinned'}, "
                  f"{args.reps} x {args.seconds:g} s per point, medians; worker start-up {startup:.2f} s, "
                  f"idle worker RSS {rss_idle:.1f} MiB\n")
            print("| conc | direct req/s | proxy req/s | proxy p50 ms | proxy p99 ms | added p50 ms | worker CPU us/req | failed |")
            print("|---|---|---|---|---|---|---|---|")
            failed = 0
            for concurrency, direct, proxied, cpu in rows:
                med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
                failed += sum(r["failed"] for r in proxied)
                print(
                    f"| {concurrency} | {med(direct, 'rps'):,.0f} | {med(proxied, 'rps'):,.0f} | {med(proxied, 'p50'):.3f} | "
                    f"{med(proxied, 'p99'):.2f} | {med(proxied, 'p50') - med(direct, 'p50'):.3f} | "
                    f"{statistics.median(cpu):.0f} | {sum(r['failed'] for r in proxied)} |"
                )
            return 1 if failed else 0
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in reversed(procs):
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def wait_workers(master: int, seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = children(master)
        if pids:
            return pids
        time.sleep(0.05)
    raise SystemExit("gunicorn started no worker")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
