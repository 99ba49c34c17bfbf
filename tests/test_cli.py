"""The command line: ``--host``/``--port`` over ``PROXY_BIND`` (a table, then real servers),
``check`` (with ``--allow-missing-env``), ``--help`` and ``--version``, run as
``python -m proxy_app`` in a subprocess the way a user or CI types them."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import proxy_app
from proxy_app.bind import BindError
from proxy_app.bind import bind_address
from proxy_app.bind import join_bind
from proxy_app.bind import split_bind
from proxy_app.config import NO_ENDPOINTS
from tests.conftest import SECRET
from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import stop_process
from tests.gunicorn_proc import write_config

# -- --host / --port over PROXY_BIND (pure) -----------------------------------------------


@pytest.mark.parametrize(
    "host, port, environ, expected",
    [
        pytest.param(None, None, {}, "0.0.0.0:4000", id="defaults"),
        pytest.param(None, None, {"PROXY_BIND": "127.0.0.1:4000"}, "127.0.0.1:4000", id="proxy-bind-alone"),
        pytest.param(None, 4100, {"PROXY_BIND": "127.0.0.1:4000"}, "127.0.0.1:4100", id="port-keeps-loopback"),
        pytest.param("127.0.0.1", None, {"PROXY_BIND": "0.0.0.0:4321"}, "127.0.0.1:4321", id="host-keeps-port"),
        pytest.param("127.0.0.1", None, {}, "127.0.0.1:4000", id="host-alone"),
        pytest.param(None, "4100", {}, "0.0.0.0:4100", id="port-alone"),
        pytest.param("10.0.0.5", 8080, {"PROXY_BIND": "127.0.0.1:4000"}, "10.0.0.5:8080", id="both-replace-both"),
        pytest.param(None, None, {"PORT": "5000"}, "0.0.0.0:5000", id="PORT-fallback"),
        pytest.param(None, None, {"PORT": "5000", "PROXY_BIND": "127.0.0.1:4000"}, "127.0.0.1:5000", id="PORT-replaces-only-the-port"),
        pytest.param(None, 4100, {"PORT": "5000"}, "0.0.0.0:4100", id="flag-beats-PORT"),
        pytest.param(None, None, {"PORT": ""}, "0.0.0.0:4000", id="empty-PORT-is-unset"),
        pytest.param(None, None, {"PROXY_BIND": ""}, "0.0.0.0:4000", id="empty-PROXY_BIND-is-unset"),
        pytest.param(None, 4100, {"PROXY_BIND": "[::1]:4000"}, "[::1]:4100", id="ipv6-port"),
        pytest.param("::1", None, {"PROXY_BIND": "127.0.0.1:4000"}, "[::1]:4000", id="ipv6-host-gets-brackets"),
        pytest.param("[::1]", None, {}, "[::1]:4000", id="ipv6-host-in-brackets"),
        pytest.param("127.0.0.1", None, {"PROXY_BIND": "[::]:4000"}, "127.0.0.1:4000", id="ipv6-base-ipv4-host"),
        pytest.param("localhost", None, {"PROXY_BIND": "127.0.0.1"}, "localhost", id="no-port-stays-no-port"),
        pytest.param(None, None, {"PROXY_BIND": "unix:/run/proxy.sock"}, "unix:/run/proxy.sock", id="unix-socket-untouched"),
        pytest.param(None, None, {"PROXY_BIND": "fd://3", "PORT": ""}, "fd://3", id="fd-untouched"),
    ],
)
def test_bind_address(host, port, environ, expected):
    assert bind_address(host, port, environ) == expected


@pytest.mark.parametrize(
    "host, port, environ, fragment",
    [
        pytest.param(
            None, 4100, {"PROXY_BIND": "unix:/run/proxy.sock"}, "PROXY_BIND='unix:/run/proxy.sock' cannot take --host or --port", id="unix"
        ),
        pytest.param("127.0.0.1", None, {"PROXY_BIND": "fd://3"}, "cannot take --host or --port", id="fd"),
        pytest.param(None, None, {"PROXY_BIND": "fd://3", "PORT": "8080"}, "(or PORT)", id="fd-with-PORT"),
        pytest.param(None, "http", {}, "--port must be a port number, got 'http'", id="port-not-number"),
        pytest.param(None, 70000, {}, "--port must be between 1 and 65535, got 70000", id="port-too-big"),
        pytest.param(None, 0, {}, "--port must be between 1 and 65535", id="port-zero"),
        pytest.param(None, None, {"PORT": "eighty"}, "PORT must be a port number, got 'eighty'", id="bad-PORT"),
        pytest.param("", None, {}, "--host must be a host name or an IP address", id="empty-host"),
        pytest.param("http://h", None, {}, "--host must be a host name or an IP address", id="url-as-host"),
        pytest.param(None, 1, {"PROXY_BIND": "[::1:4000"}, "an IPv6 address must be written [ADDRESS]:PORT", id="unclosed-bracket"),
    ],
)
def test_bind_address_errors(host, port, environ, fragment):
    with pytest.raises(BindError) as info:
        bind_address(host, port, environ)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "bind, parts",
    [
        ("127.0.0.1:4000", ("127.0.0.1", "4000")),
        ("[::1]:4000", ("::1", "4000")),
        ("[::]", ("::", None)),
        ("::1", ("::1", None)),
        ("localhost", ("localhost", None)),
        ("example.org:80", ("example.org", "80")),
    ],
)
def test_split_and_join_bind(bind, parts):
    assert split_bind(bind) == parts
    assert join_bind(*parts) == (bind if bind != "::1" else "[::1]")


# -- --version, --help ---------------------------------------------------------------------


def run_cli(*args: str, env: dict, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy_app", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_version_prints_the_package_version(tmp_path, proxy_env):
    done = run_cli("--version", env=proxy_env, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"proxy-app {proxy_app.package_version()}"


def test_version_falls_back_to_the_constant_and_matches_pyproject(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert proxy_app.package_version() == proxy_app.__version__
    with open(ROOT / "pyproject.toml", "rb") as fh:
        assert tomllib.load(fh)["project"]["version"] == proxy_app.__version__


def test_help_lists_the_commands(tmp_path, proxy_env):
    done = run_cli("--help", env=proxy_env, cwd=tmp_path)
    assert done.returncode == 0
    assert re.search(r"^\s+check\s+validate a config", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^\s+serve\s+run the proxy", done.stdout, re.MULTILINE)
    for flag in ("--config", "--host", "--port", "--num_workers", "--detailed_debug", "--version"):
        assert flag in done.stdout
    check_help = run_cli("check", "--help", env=proxy_env, cwd=tmp_path)
    assert check_help.returncode == 0 and "--allow-missing-env" in check_help.stdout


def test_a_bad_bind_is_a_usage_error_without_a_traceback(tmp_path, proxy_env):
    path = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": []}})
    done = run_cli("--config", str(path), "--port", "4100", env={**proxy_env, "PROXY_BIND": "unix:/tmp/proxy.sock"}, cwd=tmp_path)
    assert done.returncode == 2
    assert "PROXY_BIND='unix:/tmp/proxy.sock' cannot take --host or --port" in done.stderr
    assert "Traceback" not in done.stderr


# -- check ------------------------------------------------------------------------------


def test_check_prints_the_ignored_sections_line_and_warnings_like_start_up(tmp_path, proxy_env):
    path = write_config(
        tmp_path,
        {
            "model_list": [{"model_name": "m"}],
            "general_settings": {
                "alerting": ["slack"],
                "pass_through_endpoints": [{"path": "/p", "target": "https://h.example/", "headers": {"x-api-key": "os.environ/SECRET"}}],
            },
        },
    )
    done = run_cli("check", "--config", str(path), env=proxy_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ignored (not used by proxy_app): top-level section 'model_list', general_settings.alerting" in lines
    assert any(line.startswith("warning: endpoint /p (pass_through_endpoints[0]) is open") for line in lines)
    assert SECRET not in done.stdout + done.stderr


def test_check_warns_about_a_config_without_endpoints(tmp_path, proxy_env):
    path = write_config(tmp_path, {"general_settings": {"master_key": "sk-1"}})
    done = run_cli("check", "--config", str(path), env=proxy_env, cwd=tmp_path)
    assert done.returncode == 0
    assert f"warning: {NO_ENDPOINTS}" in done.stdout.splitlines()


CI_CONFIG = {
    "include": ["routes.yaml"],
    "general_settings": {"master_key": "os.environ/CI_MASTER_UNSET"},
}
CI_ROUTES = {
    "general_settings": {
        "pass_through_endpoints": [
            {
                "path": "/rerank",
                "target": "https://api.cohere.com/v1/rerank",
                "headers": {"Authorization": "bearer os.environ/CI_KEY_UNSET"},
            },
            {"path": "/env", "target": "os.environ/CI_URL_UNSET", "auth": True},
        ]
    }
}


@pytest.mark.parametrize(
    "extra, code, stdout_has, stderr_has",
    [
        pytest.param(
            (), 1, [], ["environment variable CI_MASTER_UNSET is not set", "environment variable CI_KEY_UNSET is not set"], id="strict"
        ),
        pytest.param(
            ("--allow-missing-env",),
            0,
            [
                "2 endpoint(s), master key set",
                "os.environ/CI_URL_UNSET",
                "warning: {d}/config.yaml: general_settings.master_key: "
                "environment variable CI_MASTER_UNSET is not set (allowed by --allow-missing-env)",
                "warning: {d}/routes.yaml: pass_through_endpoints[0] (/rerank).headers.Authorization: "
                "environment variable CI_KEY_UNSET is not set (allowed by --allow-missing-env)",
            ],
            [],
            id="allow-missing-env",
        ),
    ],
)
def test_check_allow_missing_env(tmp_path, proxy_env, extra, code, stdout_has, stderr_has):
    path = write_config(tmp_path, CI_CONFIG)
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(CI_ROUTES))
    done = run_cli("check", "--config", str(path), *extra, env=proxy_env, cwd=tmp_path)
    assert done.returncode == code, done.stdout + done.stderr
    for text in stdout_has:
        assert text.format(d=tmp_path) in done.stdout, done.stdout
    for text in stderr_has:
        assert text in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_check_allow_missing_env_still_fails_on_real_errors(tmp_path, proxy_env):
    path = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "nope", "target": "os.environ/UNSET_URL"}]}})
    done = run_cli("check", "--config", str(path), "--allow-missing-env", env=proxy_env, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"config error: {path}: pass_through_endpoints[0] (nope).path: must start with '/'"]


# -- --host / --port, for real --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def serving(args: list[str], env: dict, cwd: Path):
    log_path = cwd / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy_app", *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "Listening at:" not in log_path.read_text() and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, log_path.read_text()
        yield log_path
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    "proxy_bind, flags, listens",
    [
        pytest.param("127.0.0.1:{other}", ["--port", "{port}"], "127.0.0.1:{port}", id="port-keeps-the-loopback-host"),
        pytest.param("localhost:{port}", ["--host", "127.0.0.1"], "127.0.0.1:{port}", id="host-keeps-the-port"),
    ],
)
def test_flags_replace_only_their_half_of_proxy_bind(tmp_path, proxy_env, proxy_bind, flags, listens):
    port, other = free_port(), free_port()
    fill = {"port": port, "other": other}
    path = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/x", "target": "http://127.0.0.1:9/"}]}})
    env = {k: v for k, v in proxy_env.items() if k not in ("PORT", "PROMETHEUS_MULTIPROC_DIR")}
    env.update({"PROXY_BIND": proxy_bind.format(**fill), "PROXY_GRACEFUL_TIMEOUT": "5", "TMPDIR": str(tmp_path)})
    args = ["--config", str(path), "--num_workers", "1", *(flag.format(**fill) for flag in flags)]
    with serving(args, env, tmp_path) as log_path:
        assert f"Listening at: http://{listens.format(**fill)} " in log_path.read_text()
        assert answers(port)
        assert not answers(other)


def test_check_lists_config_and_stored_endpoints_with_their_source(tmp_path, proxy_env):
    """``check`` reads the store the proxy would use and lists what the endpoint API stored
    there beside the config file's endpoints, saying where each comes from; one this machine
    cannot serve (a variable it lacks) is marked and explained, never with a value."""
    from proxy_app import create_app

    state = tmp_path / "state"
    state.mkdir()
    config = {
        "general_settings": {
            "master_key": "sk-1",
            "pass_through_endpoints": [{"path": "/p", "target": "https://h.example/", "headers": {"x-api-key": "os.environ/SECRET"}}],
        }
    }
    path = write_config(tmp_path, config)
    env = {**proxy_env, "STATE_DIRECTORY": str(state), "LITELLM_SALT_KEY": "cli-salt"}
    app = create_app(str(path), environ=env)
    client = app.test_client(use_cookies=False)
    for body in (
        {"id": "made-1", "path": "/made", "target": "https://api.example/v1", "methods": ["POST"], "headers": {"Authorization": "bearer lit-SECRET-9"}},
        {"id": "made-2", "path": "/elsewhere", "target": "https://api.example/v2", "headers": {"X-K": "os.environ/ONLY_ON_ANOTHER_VM"}},
    ):
        made = client.post("/config/pass_through_endpoint", json=body, headers={"Authorization": "Bearer sk-1"})
        assert made.status_code == 200, made.get_json()
    app.extensions["proxy_app.stores"].stop()

    done = run_cli("check", "--config", str(path), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("/")}
    assert rows["/p"].endswith("config")
    assert "api.example" in rows["/made"] and rows["/made"].split()[1] == "POST" and rows["/made"].endswith("stored made-1")
    assert rows["/elsewhere"].endswith("stored made-2 (cannot be served here)")
    assert "warning: stored endpoint made-2: endpoint /elsewhere cannot be served by this instance: environment variable ONLY_ON_ANOTHER_VM is not set here" in done.stdout
    assert "1 endpoint(s), master key set; 2 stored endpoint(s)" in done.stdout
    assert "lit-SECRET" not in done.stdout + done.stderr and SECRET not in done.stdout + done.stderr
