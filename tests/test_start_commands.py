"""Every way to start the proxy, for real: the same settings, /metrics summed over the
workers, and nothing left behind.

- ``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` from another working directory (the
  checkout, as systemd runs it), and with proxy_app not importable at all;
- ``python -m proxy_app`` and the ``proxy-app`` console script from a NON-editable install
  (``pip install --target``), run from a directory that is not the checkout.

Each server listens on a socket bound here (fd://N, the port picked by the OS) and relays
to a recording upstream on loopback. ``TMPDIR`` points into the test's directory, so the
metrics directory a start makes is found there, and must be gone after SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import Gunicorn
from tests.gunicorn_proc import listener
from tests.gunicorn_proc import parse_metrics
from tests.gunicorn_proc import run_server
from tests.gunicorn_proc import stop_process
from tests.gunicorn_proc import wait_until
from tests.gunicorn_proc import write_config
from tests.upstream import fixed
from tests.upstream import stall

VENV_BIN = Path(sys.executable).parent
CALLS = 24
METRICS_GLOB = "proxy-app-metrics-*"
# Variables that would change where or how the servers listen or count.
OWN_VARIABLES = ("PROXY_BIND", "PORT", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")


# -- helpers ---------------------------------------------------------------------------


def get(server: Gunicorn, path: str, timeout: float = 20) -> tuple[int, bytes]:
    conn = server.connection(timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def scrape(server: Gunicorn) -> dict[str, float]:
    status, body = get(server, "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def base_env(proxy_env: dict, tmp_path: Path) -> dict:
    env = {k: v for k, v in proxy_env.items() if k not in OWN_VARIABLES}
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env["TMPDIR"] = str(scratch)
    # Two threads and two connection slots per worker: concurrent callers spill over to
    # the other worker instead of queueing on one.
    env.update({"PROXY_THREADS": "2", "PROXY_WORKER_CONNECTIONS": "2", "PROXY_GRACEFUL_TIMEOUT": "5"})
    return env


def metrics_dirs(env: dict) -> list[Path]:
    return sorted(Path(env["TMPDIR"]).glob(METRICS_GLOB))


def loaded_from(server: Gunicorn) -> Path:
    """The directory the server's proxy_app was imported from (logged by on_starting)."""
    match = re.search(r"proxy_app \S+ from (\S+)", server.log())
    assert match, server.log()
    return Path(match.group(1))


def passthrough_config(tmp_path: Path, upstream) -> Path:
    upstream.route("/slow", stall(0.2))
    return write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/p", "target": upstream.url + "/slow"}]}})


def call_concurrently(server: Gunicorn, path: str, count: int) -> list[int]:
    results: list[int] = []
    lock = threading.Lock()

    def call():
        status = get(server, path)[0]
        with lock:
            results.append(status)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


# -- a non-editable install ------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --target`` of a copy of the package (the checkout is never written to).

    Offline (``--no-index``) and without build isolation, so the venv's setuptools builds it.
    """
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this venv: the package cannot be built offline")
    base = tmp_path_factory.mktemp("installed")
    source = base / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "proxy_app", source / "proxy_app", ignore=shutil.ignore_patterns("__pycache__"))
    site = base / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=base,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "bin" / "proxy-app").exists() and (site / "proxy_app" / "gunicorn_conf.py").exists()
    assert not (site / "deploy").exists()
    return site


def installed_env(env: dict, site: Path) -> dict:
    return {**env, "PYTHONPATH": str(site)}


# -- the three start commands ------------------------------------------------------------


def gunicorn_command(config: Path, env: dict, site: Path):
    """(a) the checkout's config file, run from another directory (systemd's ExecStart)."""
    env = {**env, "CONFIG_FILE_PATH": str(config), "WEB_CONCURRENCY": "2"}
    argv = [str(VENV_BIN / "gunicorn"), "--chdir", str(ROOT), "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "wsgi:app"]
    return argv, env, ROOT


def module_command(config: Path, env: dict, site: Path):
    """(b) python -m proxy_app from the installed package."""
    return [sys.executable, "-m", "proxy_app", "--config", str(config), "--num_workers", "2"], installed_env(env, site), site


def script_command(config: Path, env: dict, site: Path):
    """(c) the installed proxy-app console script."""
    return [str(site / "bin" / "proxy-app"), "--config", str(config), "--num_workers", "2"], installed_env(env, site), site


@pytest.mark.parametrize(
    "command",
    [gunicorn_command, module_command, script_command],
    ids=["gunicorn-deploy-conf", "python-m-proxy_app", "proxy-app-script"],
)
def test_metrics_count_every_request_over_two_workers(command, tmp_path, upstream, proxy_env, installed):
    argv, env, package_root = command(passthrough_config(tmp_path, upstream), base_env(proxy_env, tmp_path), installed)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    with run_server(argv, env, workdir) as server:
        assert loaded_from(server) == package_root / "proxy_app"
        workers = set(wait_until(lambda: len(pids := server.worker_pids()) == 2 and pids, 20, "two workers"))
        (metrics_dir,) = metrics_dirs(env)
        assert call_concurrently(server, "/p", CALLS) == [200] * CALLS
        writers = {int(m.group(1)) for f in os.listdir(metrics_dir) if (m := re.match(r"counter_(\d+)\.db", f))}
        assert workers <= writers, "both workers served requests"
        for _ in range(4):  # whichever worker answers the scrape, the sums are the same
            samples = scrape(server)
            assert samples['proxy_requests_total{method="GET",route="/p",status="200"}'] == CALLS
            assert samples['proxy_request_duration_seconds_count{route="/p"}'] == CALLS
        assert len(upstream.requests) == CALLS
        stop_process(server.proc)
        assert server.proc.returncode == 0, server.log()
        log = server.log()
    assert "ERROR" not in log and "Traceback" not in log, log
    assert metrics_dirs(env) == [], "the metrics directory the proxy made is removed at exit"


# -- deploy/gunicorn.conf.py -------------------------------------------------------------


def not_installed_env(env: dict) -> dict:
    """For ``python -S``: the venv's libraries on PYTHONPATH, without the .pth files that
    make the checkout importable (its editable install), so proxy_app is not importable."""
    return {**env, "PYTHONPATH": sysconfig.get_paths()["purelib"]}


def test_deploy_conf_finds_its_checkout_from_any_directory_and_survives_hup(tmp_path, upstream, proxy_env):
    upstream.route("/a", fixed(200, [("Content-Type", "text/plain")], b"a"))
    upstream.route("/b", fixed(200, [("Content-Type", "text/plain")], b"b"))

    def config(*paths):
        return {"general_settings": {"pass_through_endpoints": [{"path": p, "target": upstream.url + p} for p in paths]}}

    config_path = write_config(tmp_path, config("/a"))
    env = not_installed_env({**base_env(proxy_env, tmp_path), "CONFIG_FILE_PATH": str(config_path)})
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import importlib.util; print(importlib.util.find_spec('proxy_app'))"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.strip() == "None", "proxy_app must not be importable for this test"
    argv = [sys.executable, "-S", "-m", "gunicorn", "--chdir", str(ROOT), "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "wsgi:app"]
    with run_server(argv, env, workdir) as server:
        assert loaded_from(server) == ROOT / "proxy_app"
        assert get(server, "/a") == (200, b"a")
        write_config(tmp_path, config("/a", "/b"))
        os.kill(server.proc.pid, signal.SIGHUP)  # gunicorn executes the config file again
        wait_until(lambda: get(server, "/b")[0] == 200, 20, "the reloaded config")
        assert get(server, "/a") == (200, b"a")
        assert server.proc.poll() is None
        log = server.log()
    assert "Traceback" not in log and "ModuleNotFoundError" not in log, log


SETTINGS_PROBE = """
import json, sys
from gunicorn.app.wsgiapp import WSGIApplication

conf_file, checkout = sys.argv[1:3]

def load(location):
    sys.argv = ["gunicorn", "-c", location]
    app = WSGIApplication("%(prog)s")
    return app, {name: setting.get() for name, setting in app.cfg.settings.items()}

thin, via_file = load(conf_file)
checkout_entries = sys.path.count(checkout)
thin.reload()  # what HUP does: the file is executed again
after_hup = {name: setting.get() for name, setting in thin.cfg.settings.items()}
_, via_module = load("python:proxy_app.gunicorn_conf")
import proxy_app.gunicorn_conf as conf
names = set(via_file)
print(json.dumps({
    "exported": sorted(conf.__all__),
    "taken": sorted(n for n in vars(conf) if n in names),
    "differ": sorted(n for n in names if via_file[n] != via_module[n] and n not in ("config",)),
    "differ_after_hup": sorted(n for n in names if after_hup[n] != via_file[n]),
    "worker_class": via_file["worker_class"],
    "wsgi_app": via_file["wsgi_app"],
    "checkout_entries": [checkout_entries, sys.path.count(checkout)],
    "prometheus_imported": "prometheus_client" in sys.modules,
}))
"""


def test_deploy_conf_and_package_module_give_gunicorn_the_same_settings(tmp_path, proxy_env):
    env = not_installed_env({**base_env(proxy_env, tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")})
    done = subprocess.run(
        [sys.executable, "-S", "-c", SETTINGS_PROBE, str(ROOT / "deploy" / "gunicorn.conf.py"), str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # gunicorn takes every global named like a setting: exactly the declared ones.
    assert result["taken"] == result["exported"]
    assert {"bind", "workers", "threads", "worker_class", "on_starting", "on_reload", "child_exit", "on_exit"} <= set(result["exported"])
    assert result["differ"] == [] and result["differ_after_hup"] == []
    assert result["worker_class"] == "proxy_app.worker.ProxyThreadWorker"
    assert result["wsgi_app"] == "proxy_app.wsgi:app"
    assert result["checkout_entries"] == [1, 1], "the checkout is put on sys.path once, HUP or not"
    assert result["prometheus_imported"] is False


IMPORTS_PROBE = """
import sys
import proxy_app, proxy_app.cli, proxy_app.config, proxy_app.bind, proxy_app.lifecycle, proxy_app.worker, proxy_app.logs
import proxy_app.gunicorn_conf
before = "prometheus_client" in sys.modules
from proxy_app import create_app
print(before, "prometheus_client" in sys.modules, create_app.__module__)
"""


def test_importing_the_package_cli_and_settings_does_not_import_prometheus_client(tmp_path, proxy_env):
    # The directory exists, as the gunicorn settings make sure: metrics without labels open
    # their value files in it when proxy_app.metrics is imported.
    (tmp_path / "prom").mkdir()
    env = {**base_env(proxy_env, tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    done = subprocess.run([sys.executable, "-c", IMPORTS_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "proxy_app.factory"]


def test_metrics_log_an_error_when_prometheus_client_was_imported_too_early(tmp_path, upstream, proxy_env):
    """The regression this file guards against, made on purpose: a visible ERROR."""
    config = passthrough_config(tmp_path, upstream)
    env = {**base_env(proxy_env, tmp_path), "CONFIG_FILE_PATH": str(config), "WEB_CONCURRENCY": "1"}
    early = [
        sys.executable,
        "-c",
        "import prometheus_client, sys; from gunicorn.app.wsgiapp import run; sys.argv[0] = 'gunicorn'; run()",
        "-c",
        str(ROOT / "deploy" / "gunicorn.conf.py"),
    ]
    with run_server(early, env, tmp_path) as server:
        assert get(server, "/metrics")[0] == 200
        wait_until(lambda: "PROMETHEUS_MULTIPROC_DIR is set but prometheus_client was imported before it" in server.log(), 10, "the error")
        assert " ERROR proxy_app: metrics:" in server.log()


# -- what a start leaves behind -----------------------------------------------------------


def test_the_operators_metrics_directory_is_emptied_at_start_and_kept_at_exit(tmp_path, upstream, proxy_env):
    prom = tmp_path / "prometheus"
    prom.mkdir()
    (prom / "counter_1.db").write_bytes(b"stale")
    config = passthrough_config(tmp_path, upstream)
    env = {**base_env(proxy_env, tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    argv = [sys.executable, "-m", "proxy_app", "--config", str(config), "--num_workers", "1"]
    with run_server(argv, env, tmp_path) as server:
        assert not (prom / "counter_1.db").exists()
        assert get(server, "/p")[0] == 200
        stop_process(server.proc)
        assert server.proc.returncode == 0, server.log()
    assert prom.is_dir(), "a directory the operator chose is never removed"
    assert metrics_dirs(env) == []


def test_a_failed_start_leaves_no_metrics_directory(tmp_path, proxy_env):
    env = base_env(proxy_env, tmp_path)
    bad = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/x"}]}})
    done = subprocess.run(
        [sys.executable, "-m", "proxy_app", "--config", str(bad)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1 and "config error:" in done.stderr and "Traceback" not in done.stderr
    assert metrics_dirs(env) == []
    good = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/x", "target": "http://127.0.0.1:9/"}]}})
    taken = listener()  # the address is in use: gunicorn gives up after on_starting
    try:
        host, port = taken.getsockname()
        done = subprocess.run(
            [sys.executable, "-m", "proxy_app", "--config", str(good), "--host", host, "--port", str(port)],
            cwd=tmp_path,
            env={**env, "PROXY_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode != 0, done.stderr
    assert metrics_dirs(env) == []
