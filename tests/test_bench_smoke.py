"""The benchmark in bench/ keeps working (a few seconds; its numbers are not asserted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.gunicorn_proc import ROOT


@pytest.mark.parametrize("app", [[], ["--app", "bench.floor_apps:flask_constant"]], ids=["proxy", "flask_floor"])
def test_bench_smoke_runs_and_the_proxy_answers_every_request(app):
    missing = [tool for tool in ("cc", "h2load", "taskset") if not shutil.which(tool)]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {', '.join(missing)} (apt-get install gcc nghttp2-client)")
    done = subprocess.run(
        [sys.executable, "bench/bench.py", "--smoke", *app], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("| 8 |")]
    assert row and row[0].endswith("| 0 |"), done.stdout  # zero failed requests
