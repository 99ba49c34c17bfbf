"""Shared fixtures: a recording upstream on loopback and apps built from mappings."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from proxy_app import create_app
from proxy_app import patches
from tests.upstream import Upstream

# Real PostgreSQL and Redis servers for the tests that need them (fixtures postgres, pg_url,
# redis_server, redis_url).
pytest_plugins = ("tests.servers",)

PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")
MASTER_KEY = "sk-test-master-0123456789"
SECRET = "secret-upstream-key-42"


# Every app and proxy the tests start keeps its embedded SQLite database and usage spool in
# one temporary directory (as systemd's StateDirectory= would), never in the working tree.
STATE_DIRECTORY = tempfile.mkdtemp(prefix="proxy-app-test-state-")
os.environ["STATE_DIRECTORY"] = STATE_DIRECTORY


@pytest.fixture(scope="session", autouse=True)
def _state_directory():
    yield
    shutil.rmtree(STATE_DIRECTORY, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _library_patches():
    # What the gunicorn worker applies when it starts (proxy_app/worker.py), for the tests
    # that run the app in-process; the server-side ones concern gunicorn only. Honours
    # PROXY_SPEEDUPS like the worker does.
    patches.apply([patches.UPSTREAM])
    yield
    patches.revert()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    # The proxy must not depend on the machine's proxy variables (and ignores them).
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


def config_for(*endpoints: dict, master_key: str | None = MASTER_KEY, **general) -> dict:
    settings = {"pass_through_endpoints": list(endpoints), **general}
    if master_key is not None:
        settings["master_key"] = master_key
    return {"general_settings": settings}


@pytest.fixture
def make_client():
    """Build a test client for endpoints: ``make_client(endpoint, ..., env={...})``."""

    def build(*endpoints: dict, env: dict | None = None, master_key: str | None = MASTER_KEY, **general):
        environ = {"SECRET": SECRET, "STATE_DIRECTORY": STATE_DIRECTORY, **(env or {})}
        app = create_app(config_for(*endpoints, master_key=master_key, **general), environ=environ)
        return app.test_client(use_cookies=False)

    return build


def subprocess_env() -> dict:
    """An os.environ copy for subprocesses: no proxy variables, the test secret set."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV}
    env["SECRET"] = SECRET
    return env


@pytest.fixture
def proxy_env():
    return subprocess_env()
