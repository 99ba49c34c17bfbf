"""The keyed benchmark (bench/keyed.py) keeps working on both stores (a few seconds; its numbers are not asserted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.gunicorn_proc import ROOT


def test_keyed_bench_smoke_runs_on_both_stores_and_every_request_is_answered():
    # Like tests/test_bench_smoke.py, but CI installs redis-server for the store tests anyway
    # (tests/servers.py), so a missing tool fails here instead of skipping.
    missing = [tool for tool in ("cc", "h2load", "taskset", "redis-server") if not shutil.which(tool)]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {', '.join(missing)} (apt-get install gcc nghttp2-client redis-server)")
    done = subprocess.run(
        [sys.executable, "bench/keyed.py", "--smoke", "--stores", "sqlite,redis"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith(("| sqlite |", "| redis |"))}
    assert set(rows) == {"sqlite", "redis"}, done.stdout
    for line in rows.values():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[-1] == "0", done.stdout  # zero failed requests
        recorded, answered = (int(n.replace(",", "")) for n in cells[-2].split("/"))
        # Every answered request left a usage row (a few more: requests in flight when h2load
        # stopped at its deadline were answered to nobody, and recorded all the same).
        assert recorded >= answered, done.stdout
