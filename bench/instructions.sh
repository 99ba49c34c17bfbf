#!/usr/bin/env bash
# User-space instructions per request of the app alone (bench/profile_app.py), counted by
# valgrind's callgrind: repeatable where CPU time is not (a shared VM's timings vary by 20%
# from run to run; an instruction count varies by well under 1%).
#
#   bench/instructions.sh UPSTREAM_PORT [CHECKOUT]
#
# Runs profile_app.py for 200 and for 1200 requests and prints the difference / 1000, so
# start-up and warm-up cancel out. CHECKOUT (default: this one) lets two checkouts be
# compared with the same interpreter (PYTHONPATH points at it). Needs valgrind.
set -euo pipefail
port=$1
root=$(cd "${2:-$(dirname "$0")/..}" && pwd)
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
count() {
  PYTHONHASHSEED=0 PYTHONPATH="$root" valgrind --tool=callgrind --callgrind-out-file=/dev/null \
    "$python" "$root/bench/profile_app.py" --upstream-port "$port" --n "$1" 2>&1 | sed -n 's/.*Collected : //p'
}
small=$(count 200)
large=$(count 1200)
echo "$root: $(( (large - small) / 1000 )) instructions per request"
