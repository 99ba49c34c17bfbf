"""Run the production stack (gunicorn -c deploy/gunicorn.conf.py wsgi:app) as a subprocess.

The listening socket is bound here, on 127.0.0.1 port 0, and handed to gunicorn as
``fd://N``: no port is guessed, and no other process can take it in between.
:func:`run_server` does the same for any start command (the CLI, an installed package).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


class Gunicorn:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connection(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def listener(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a port the OS picked, to hand to a server as fd://N."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


@contextmanager
def run_gunicorn(config_path: Path, env: dict, workers: int = 1, threads: int = 8, wait: bool = True):
    env = {
        **env,
        "CONFIG_FILE_PATH": str(config_path),
        "PROXY_THREADS": str(threads),
        "WEB_CONCURRENCY": str(workers),
        "PROXY_GRACEFUL_TIMEOUT": "5",
    }
    with run_server([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py"], env, ROOT, wait=wait) as server:
        yield server


@contextmanager
def run_server(argv: list[str], env: dict, cwd: Path, wait: bool = True):
    """Start a proxy command in its own session, listening on a socket bound here and passed
    as ``PROXY_BIND=fd://N``; wait until it answers /health/readiness; SIGTERM it by PID."""
    sock = listener()
    port = sock.getsockname()[1]
    fd = sock.fileno()
    log_fd, log_name = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**env, "PROXY_BIND": f"fd://{fd}"},
            pass_fds=[fd],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        sock.close()
        os.close(log_fd)
    server = Gunicorn(proc, port, Path(log_name))
    try:
        if wait:
            _wait_ready(server)
        yield server
    finally:
        stop_process(proc)
        os.unlink(log_name)


def _wait_ready(server: Gunicorn) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited {server.proc.returncode}:\n{server.log()}")
        try:
            conn = server.connection(timeout=1)
            conn.request("GET", "/health/readiness")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn not ready after {START_TIMEOUT}s:\n{server.log()}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a process this test started, then SIGKILL it if it lingers (bounded)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def status_kib(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Reset a process's RSS high-water mark (VmHWM); return its current RSS (KiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_kib(pid, "VmRSS")


def wait_until(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true (returned), for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample with labels: value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
