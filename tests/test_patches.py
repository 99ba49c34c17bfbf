"""Library patches (proxy_app/patches.py): applied only where the server starts, each one
checked, none on import, and the speed-only ones switchable with PROXY_SPEEDUPS=0."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap

import pytest
from urllib3 import connectionpool

from proxy_app import patches
from proxy_app import wire
from tests.conftest import subprocess_env
from tests.gunicorn_proc import ROOT
from tests.gunicorn_proc import run_gunicorn
from tests.gunicorn_proc import write_config
from tests.upstream import Upstream

NAMES = [p.name for p in patches.PATCHES]


def run_python(code: str, env: dict | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_every_proxy_app_module_changes_no_other_module():
    # Every module and class of the libraries the proxy patches or subclasses, snapshot
    # before proxy_app is imported, compared attribute by attribute (identity) after.
    report = run_python(
        """
        import importlib, json, pkgutil, sys
        import http.client, email.parser
        import urllib3, urllib3.connection, urllib3.connectionpool, urllib3.response, urllib3.util.url, urllib3.poolmanager
        import requests, requests.adapters, requests.sessions, requests.models, requests.cookies
        import gunicorn.http.wsgi, gunicorn.http.unreader, gunicorn.http.parser, gunicorn.workers.gthread, gunicorn.util
        import werkzeug.wrappers, werkzeug.routing, werkzeug.serving, flask, flask.sessions, yaml

        ROOTS = ("http", "email", "urllib3", "requests", "gunicorn", "werkzeug", "flask", "yaml", "socket", "ssl")

        def snapshot():
            seen = {}
            for name, module in list(sys.modules.items()):
                if module is None or name.split(".")[0] not in ROOTS:
                    continue
                seen[name] = dict(vars(module))
                for attr, value in list(vars(module).items()):
                    if isinstance(value, type) and getattr(value, "__module__", "") == name:
                        seen[name + ":" + attr] = dict(vars(value))
            return seen

        before = snapshot()
        import proxy_app
        skip = {"proxy_app.wsgi", "proxy_app.__main__"}  # these start a server / build the app
        names = [m.name for m in pkgutil.iter_modules(proxy_app.__path__, "proxy_app.") if m.name not in skip]
        for name in names:
            importlib.import_module(name)
        after = snapshot()
        changed = []
        for key, attrs in before.items():
            now = after[key]
            for attr, value in attrs.items():
                if attr not in now or now[attr] is not value:
                    changed.append(f"{key}.{attr}")
        print(json.dumps({"imported": names, "changed": changed}))
        """
    )
    result = json.loads(report)
    assert "proxy_app.patches" in result["imported"] and "proxy_app.worker" in result["imported"]
    assert result["changed"] == []


def test_every_patched_attribute_exists_in_the_pinned_libraries():
    # A fresh interpreter, nothing applied: what each patch replaces is the library's own.
    report = run_python(
        """
        import json
        from proxy_app import patches
        print(json.dumps({p.name: [hasattr(p.owner(), p.leaf), patches.applied()[p.name]] for p in patches.PATCHES}))
        """
    )
    assert json.loads(report) == {name: [True, False] for name in NAMES}


def test_apply_replaces_and_revert_restores_each_attribute():
    originals = {name: patches.original(name) for name in NAMES}
    try:
        assert patches.apply(speedups=True) == NAMES
        assert patches.applied() == dict.fromkeys(NAMES, True)
        assert connectionpool._encode_target("/a%2fb/%zz") == "/a%2fb/%zz"
        assert http.client.parse_headers is wire.parse_headers
        patches.revert()
        assert patches.applied() == dict.fromkeys(NAMES, False)
        for patch in patches.PATCHES:
            assert getattr(patch.owner(), patch.leaf) is originals[patch.name]
        # urllib3's own function is what the patch exists for: it rewrites the target.
        assert connectionpool._encode_target("/a%2fb/%zz") != "/a%2fb/%zz"
    finally:
        patches.revert()
        patches.apply([patches.UPSTREAM])  # what conftest set up for the other tests


def test_a_renamed_library_attribute_stops_apply_with_its_name():
    missing = patches.Patch("gone", patches.UPSTREAM, "http.client", "parse_headers_renamed", lambda: None, correctness=True, why="test")
    gone_class = patches.Patch("gone2", patches.SERVER, "gunicorn.http.unreader", "NoSuchClass.attr", lambda: None, correctness=False, why="test")
    for patch, where in ((missing, "http.client.parse_headers_renamed"), (gone_class, "gunicorn.http.unreader.NoSuchClass.attr")):
        with pytest.raises(patches.PatchTargetMissing, match=where.replace(".", r"\.")):
            patches.apply_patches([patch])
    assert not hasattr(http.client, "parse_headers_renamed")


@pytest.mark.parametrize(
    ("value", "enabled"),
    [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False), ("no", False), ("off", False), (" OFF ", False)],
)
def test_speedups_switch(value, enabled):
    environ = {} if value is None else {"PROXY_SPEEDUPS": value}
    assert patches.speedups_enabled(environ) is enabled


@pytest.mark.parametrize("speedups", [True, False])
def test_selection_keeps_correctness_patches_always(speedups):
    chosen = {p.name for p in patches.selected(speedups=speedups)}
    correctness = {p.name for p in patches.PATCHES if p.correctness}
    assert correctness == {"raw_request_target"}
    assert chosen == (set(NAMES) if speedups else correctness)
    assert {p.name for p in patches.selected([patches.UPSTREAM], speedups=True)} == {"raw_request_target", "plain_head_parser"}


def test_each_correctness_patch_names_the_test_that_needs_it():
    for patch in patches.PATCHES:
        if patch.correctness:
            path, test = patch.needed_by.split("::")
            assert f"def {test}(" in (ROOT / path).read_text(), patch.needed_by


@pytest.mark.parametrize(("speedups", "applied"), [("1", NAMES), ("0", ["raw_request_target"])])
def test_the_gunicorn_worker_applies_them_at_start(tmp_path, speedups, applied):
    with Upstream() as up:
        config = write_config(tmp_path, {"general_settings": {"pass_through_endpoints": [{"path": "/p", "target": up.url + "/base", "include_subpath": True}]}})
        with run_gunicorn(config, {**subprocess_env(), "PROXY_SPEEDUPS": speedups}, workers=1) as server:
            conn = server.connection()
            # The correctness patch at work in the worker: the raw target, byte for byte.
            conn.request("GET", "/p/a%2fb/%zz?q=%2f")
            assert conn.getresponse().read() is not None
            conn.close()
            assert up.wait_for_requests(1)[0].target == "/base/a%2fb/%zz?q=%2f"
            log = server.log()
    not_applied = [n for n in NAMES if n not in applied]
    line = f"library patches in place: {', '.join(applied)}; not applied: {', '.join(not_applied) or 'none'}"
    assert line in log
